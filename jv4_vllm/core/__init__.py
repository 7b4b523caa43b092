"""The serving core, free of torch and of the web framework: value types, what a prepared
checkpoint declares, prompts, pooling math, the vLLM wire, image intake, replica pools and
the engine that ties them together. Data flows one way: items -> prompts -> replicas ->
pooled vectors."""
