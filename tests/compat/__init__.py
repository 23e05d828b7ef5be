"""The compatibility suite (issue 23): chunkwatch in services written the way users write them."""
