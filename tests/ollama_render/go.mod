module l3zhlocal/ollama_render

go 1.19
