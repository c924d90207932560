"""relayrace: fail over LLM requests between ranked provider actors, on trio."""
