"""Every name chunkwatch emits: layers, metric names, span names and attribute keys.

Code, dashboards, alert rules and the collector config are checked against this
module by tests, so a rename happens here or nowhere. Where OpenTelemetry's
semantic conventions (GenAI, HTTP, error) define a name, it is used as-is.

Versions targeted (docs/tracing.md, "Conventions" has the table): OpenTelemetry semantic
conventions v1.41 — HTTP server and client spans (stable), GenAI client spans, agent
spans and metrics (development), messaging spans (development). The tracer says so with
:data:`SCHEMA_URL`.
"""

from __future__ import annotations

from typing import Final

SCHEMA_URL: Final = "https://opentelemetry.io/schemas/1.41.0"

# -- layers, bottom (network) to top (browser) ------------------------------------------------
# LAYERS is chunkwatch.probes.PROBES's layers, in its order (a test checks): a new layer is a
# name here, its probe module, and a row there.
GATEWAY: Final = "gateway"
SDK: Final = "sdk"
LANGGRAPH: Final = "langgraph"
QUEUE: Final = "queue"
SSE: Final = "sse"
HTTP: Final = "http"
BROWSER: Final = "browser"  # what the person's browser received, from its beacon
LAYERS: Final = (GATEWAY, SDK, LANGGRAPH, QUEUE, SSE, HTTP, BROWSER)
NO_LAYER: Final = "none"  # the verdict layer of a healthy request
MODEL: Final = "model"  # doctor: the direct model endpoint fails too

# Response headers that identify a request to a gateway's or cloud's support team
# (recorded by the gateway probe and the doctor; values only, truncated).
REQUEST_ID_HEADERS: Final = (
    "x-request-id",
    "apim-request-id",
    "x-ms-request-id",
    "x-ms-client-request-id",
    "x-azure-ref",
    "cf-ray",
    "x-amzn-requestid",
    "x-amz-apigw-id",
    "x-cloud-trace-context",
)

# -- metric names (Prometheus; counters are exposed with the `_total` suffix) -------------------
REQUESTS: Final = "chunkwatch_requests"
STREAMS: Final = "chunkwatch_streams"
CHUNKS: Final = "chunkwatch_chunks"
TIME_TO_FIRST_CHUNK: Final = "chunkwatch_time_to_first_chunk_seconds"
STREAM_DURATION: Final = "chunkwatch_stream_duration_seconds"
CHUNK_GAP_MAX: Final = "chunkwatch_chunk_gap_max_seconds"
STREAMS_OPEN: Final = "chunkwatch_streams_open"
QUEUE_WAIT: Final = "chunkwatch_queue_wait_seconds"
QUEUE_DEPTH_MAX: Final = "chunkwatch_queue_depth_max"
SSE_DISCONNECTS: Final = "chunkwatch_sse_disconnects"
INSTRUMENTATION_ERRORS: Final = "chunkwatch_instrumentation_errors"
STALLS: Final = "chunkwatch_stalls"
UNLINKED_STREAMS: Final = "chunkwatch_unlinked_streams"  # {layer}: no request could be found
# {upstream}: units model streams received after their client left; per such stream, the
# time from the client leaving until it stopped
ORPHANED_CHUNKS: Final = "chunkwatch_orphaned_chunks"
ORPHANED_STREAM_SECONDS: Final = "chunkwatch_orphaned_stream_seconds"
FALLBACKS: Final = "chunkwatch_fallbacks"  # guard: {upstream, reason}
STREAM_MODE: Final = "chunkwatch_stream_mode"  # guard: a state set {upstream, mode}
BREAKER_TRANSITIONS: Final = "chunkwatch_breaker_transitions"  # guard: {upstream, to}
# {reason}: beacons the endpoint refused, by one of BEACON_REFUSALS (never client input)
BEACONS_REFUSED: Final = "chunkwatch_beacons_refused"
BEACON_REFUSALS: Final = (
    "too_large",
    "malformed",
    "forged",
    "expired",
    "replayed",
    "unknown_stream",
    "origin",
    "rate_limited",
)
GENAI_OPERATION_DURATION: Final = "gen_ai_client_operation_duration_seconds"
GENAI_TIME_TO_FIRST_CHUNK: Final = "gen_ai_client_operation_time_to_first_chunk_seconds"
GENAI_TOKEN_USAGE: Final = "gen_ai_client_token_usage"  # {token}: no unit suffix

# -- metric label names -----------------------------------------------------------------------
L_LAYER: Final = "layer"
L_OUTCOME: Final = "outcome"
L_UPSTREAM: Final = "upstream"
L_MODE: Final = "mode"  # chunkwatch_stream_mode: one of STREAM_MODES
STREAM_MODES: Final = ("tokens", "updates")  # token streaming; state updates (breaker open)
L_STAGE: Final = "stage"
EXEMPLAR_TRACE_ID: Final = "trace_id"  # the exemplar label linking a sample to its trace
L_KIND: Final = "kind"
L_REASON: Final = "reason"  # "<outcome>@<layer>"
L_TO: Final = "to"  # breaker state: closed, open, half_open

# -- span names -------------------------------------------------------------------------------
SPAN_SSE: Final = "sse stream"
SPAN_BROWSER: Final = "browser stream"  # from its beacon, in the request's trace
SPAN_AGENT: Final = "invoke_agent"  # GenAI: "invoke_agent {agent}"
# messaging: "{messaging.operation.name}" (the queue has no destination name)
SPAN_QUEUE_PUBLISH: Final = "send"
SPAN_QUEUE_RECEIVE: Final = "receive"

# -- span event names -------------------------------------------------------------------------
EVENT_STALL: Final = "chunkwatch.stall"

# -- our attribute keys -----------------------------------------------------------------------
A_LAYER: Final = "chunkwatch.layer"
A_CHUNKS: Final = "chunkwatch.chunks"
A_OUTCOME: Final = "chunkwatch.outcome"
A_END: Final = "chunkwatch.end"
A_UPSTREAM: Final = "chunkwatch.upstream"
A_DETAIL: Final = "chunkwatch.detail"
A_VERDICT: Final = "chunkwatch.verdict"  # "<outcome>@<layer>" or "ok"
A_VERDICT_LAYER: Final = "chunkwatch.verdict.layer"
A_VERDICT_OUTCOME: Final = "chunkwatch.verdict.outcome"
A_VERDICT_DETAIL: Final = "chunkwatch.verdict.detail"
A_FUNNEL_PREFIX: Final = "chunkwatch.funnel."  # + layer: units that layer passed on
A_TTFC: Final = "chunkwatch.time_to_first_chunk"
A_GAP_MAX: Final = "chunkwatch.chunk_gap_max"
A_CONTENT_CHUNKS: Final = "chunkwatch.content_chunks"
A_BYTES: Final = "chunkwatch.bytes"
A_DONE: Final = "chunkwatch.done_seen"
A_COMMENTS: Final = "chunkwatch.comments"
A_STALL_KIND: Final = "chunkwatch.stall.kind"
A_STALL_AFTER: Final = "chunkwatch.stall.after"
A_QUEUE_DEPTH_MAX: Final = "chunkwatch.queue.depth_max"
A_QUEUE_WAIT: Final = "chunkwatch.queue.wait"
A_DISCONNECTED: Final = "chunkwatch.client_disconnected"
A_LINKED: Final = "chunkwatch.linked"  # False: no inbound request could be found for it
A_SILENT_FOR: Final = "chunkwatch.silent_for"  # open and silent that long at request end
A_ORPHANED: Final = "chunkwatch.orphaned"  # the root span: a model stream ran on, unread
A_ORPHANED_STREAMS: Final = "chunkwatch.orphaned.streams"  # open when the client left, or after
A_ORPHANED_CHUNKS: Final = "chunkwatch.orphaned.chunks"  # units they received after it left
A_ORPHANED_SECONDS: Final = "chunkwatch.orphaned.seconds"  # the longest one ran on that long
A_ORPHANED_STILL_RUNNING: Final = "chunkwatch.orphaned.still_running"  # after orphans.WAIT
SPAN_GATEWAY_BODY: Final = "gateway response body"  # under another tool's HTTP client span
# the browser span: the beacon's facts (the rest are the common stream attributes)
A_BROWSER_FIRST_BYTE: Final = "chunkwatch.browser.time_to_first_byte"  # seconds
A_BROWSER_TERMINAL: Final = "chunkwatch.browser.terminal"  # the terminal event arrived
A_BROWSER_WRITTEN: Final = "chunkwatch.browser.events_written"  # the sse layer's count
A_BROWSER_DURATION: Final = "chunkwatch.browser.duration"  # seconds, as the browser saw it
A_MODE: Final = "chunkwatch.stream_mode"
A_FALLBACK_REASON: Final = "chunkwatch.fallback.reason"
EVENT_FALLBACK: Final = "chunkwatch.fallback"
A_PROMPT: Final = "chunkwatch.content.prompt"  # only with capture_content=True
A_COMPLETION: Final = "chunkwatch.content.completion"  # only with capture_content=True

# -- OpenTelemetry semantic conventions we use --------------------------------------------------
ERROR_TYPE: Final = "error.type"
GEN_AI_OPERATION_NAME: Final = "gen_ai.operation.name"
GEN_AI_PROVIDER_NAME: Final = "gen_ai.provider.name"
GEN_AI_REQUEST_MODEL: Final = "gen_ai.request.model"
GEN_AI_REQUEST_STREAM: Final = "gen_ai.request.stream"
GEN_AI_RESPONSE_MODEL: Final = "gen_ai.response.model"
GEN_AI_RESPONSE_ID: Final = "gen_ai.response.id"
GEN_AI_RESPONSE_FINISH_REASONS: Final = "gen_ai.response.finish_reasons"
GEN_AI_RESPONSE_TTFC: Final = "gen_ai.response.time_to_first_chunk"
GEN_AI_USAGE_INPUT_TOKENS: Final = "gen_ai.usage.input_tokens"
GEN_AI_USAGE_OUTPUT_TOKENS: Final = "gen_ai.usage.output_tokens"
GEN_AI_AGENT_NAME: Final = "gen_ai.agent.name"
GEN_AI_CONVERSATION_ID: Final = "gen_ai.conversation.id"
GEN_AI_PROVIDER_AZURE: Final = "azure.ai.openai"
GEN_AI_PROVIDER_OPENAI: Final = "openai"
HTTP_REQUEST_METHOD: Final = "http.request.method"
HTTP_RESPONSE_STATUS_CODE: Final = "http.response.status_code"
HTTP_ROUTE: Final = "http.route"
URL_PATH: Final = "url.path"
URL_FULL: Final = "url.full"
HTTP_RESPONSE_BODY_SIZE: Final = "http.response.body.size"
HTTP_RESPONSE_HEADER_PREFIX: Final = "http.response.header."
URL_SCHEME: Final = "url.scheme"
SERVER_ADDRESS: Final = "server.address"
SERVER_PORT: Final = "server.port"
CLIENT_ADDRESS: Final = "client.address"
USER_AGENT_ORIGINAL: Final = "user_agent.original"
NETWORK_PROTOCOL_VERSION: Final = "network.protocol.version"
MESSAGING_SYSTEM: Final = "messaging.system"
MESSAGING_OPERATION_TYPE: Final = "messaging.operation.type"
MESSAGING_OPERATION_NAME: Final = "messaging.operation.name"
MESSAGING_BATCH_COUNT: Final = "messaging.batch.message_count"
