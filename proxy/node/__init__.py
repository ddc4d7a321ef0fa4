"""``llm-proxy node``: the agent that runs beside a model runtime on a GPU node.

It reports the node's hardware and the runtime's health, supervises the runtime
(a child process group, or a systemd unit), provisions Hugging Face weights for
vLLM, and registers with the proxy, which talks back to it over HTTP with a
per-node token. See docs/deployment.md, "The node agent".
"""
