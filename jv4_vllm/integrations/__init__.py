"""Framework integrations (optional extras): LangChain and LlamaIndex embedding classes."""
