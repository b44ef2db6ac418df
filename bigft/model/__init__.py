"""The model: directories checked, tokenizer and weights loaded, attention chosen, the
fine-tuning method applied (full, freeze, LoRA / DoRA / QLoRA), and the export."""
