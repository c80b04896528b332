"""Fine-tuning: classification and supervised fine-tuning (SFT) data, losses and driver."""
