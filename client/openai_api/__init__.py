"""OpenAI-compatible chat API in front of the MGM Triton server (`mgm-openai`, `mgm-serve --openai_port`)."""
