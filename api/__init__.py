"""flowcni.api: the agent API's wire schema, shared by the agent and flowctl (stdlib only)."""
