"""What runs the result: test (base vs fine-tuned), chat, serve, the Ollama Modelfile, the run summary."""
