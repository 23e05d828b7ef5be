"""The reference service can be given its model endpoint's key, and never shows it."""

from __future__ import annotations

from pathlib import Path

import pytest

from chunkwatch_lab.agent import LOCAL_API_KEY, LLMConfig, api_key_from_env, make_model

SECRET = "sk-azure-NEVER-IN-A-LOG"


def test_the_key_comes_from_the_environment_in_order(tmp_path: Path) -> None:
    """AZURE_OPENAI_API_KEY, then OPENAI_API_KEY, then a key file, then the local placeholder."""
    key_file = tmp_path / "key"
    key_file.write_text(SECRET + "-file\n")
    file_env = {"CHUNKWATCH_API_KEY_FILE": str(key_file)}
    assert api_key_from_env({}) == LOCAL_API_KEY
    assert api_key_from_env(file_env) == SECRET + "-file"
    assert api_key_from_env({**file_env, "OPENAI_API_KEY": "openai"}) == "openai"
    both = {"OPENAI_API_KEY": "openai", "AZURE_OPENAI_API_KEY": SECRET}
    assert api_key_from_env({**file_env, **both}) == SECRET


def test_a_bad_key_file_is_an_error_that_names_the_variable(tmp_path: Path) -> None:
    """A missing or empty key file fails at start-up, naming the variable."""
    empty = tmp_path / "empty"
    empty.write_text("\n")
    for path in (tmp_path / "missing", empty):
        with pytest.raises(ValueError, match="CHUNKWATCH_API_KEY_FILE"):
            api_key_from_env({"CHUNKWATCH_API_KEY_FILE": str(path)})


def test_the_gunicorn_config_passes_the_key_to_the_model_and_never_shows_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """config_from_env (the gunicorn entry point's) reaches AzureChatOpenAI with the key,
    and neither the config's repr nor the model's shows it."""
    monkeypatch.setenv("CHUNKWATCH_LLM_URL", "http://127.0.0.1:9")  # the module's own app
    from chunkwatch_lab.wsgi import config_from_env  # builds nothing until first use

    config = config_from_env(
        {"CHUNKWATCH_LLM_URL": "http://127.0.0.1:9", "AZURE_OPENAI_API_KEY": SECRET}
    )
    assert config.llm.api_key == SECRET
    assert SECRET not in repr(config) and SECRET not in repr(config.llm)
    model = make_model(config.llm, streaming=True)
    assert model.openai_api_key is not None
    assert model.openai_api_key.get_secret_value() == SECRET
    assert SECRET not in repr(model)
    assert LLMConfig(url="x").api_key == LOCAL_API_KEY
