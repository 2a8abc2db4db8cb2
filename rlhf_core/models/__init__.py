"""Tokenizers and models as Hugging Face folders: the actor (a causal LM), the reward model / critic (a
backbone with a value head), LoRA through peft."""
