"""Front doors that serve a loaded model: the gradio web UI (`webui`) and the documents it reads
(`documents`)."""
