"""LoRA supervised fine-tuning with TRL and PEFT."""
