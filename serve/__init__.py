"""`splitvlm serve`: vLLM's OpenAI server, with stored embeddings loaded into its encoder cache."""
