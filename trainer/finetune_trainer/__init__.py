"""The FineTuneJob trainer: S3 in, fine-tune under torchrun + DeepSpeed, checkpoints and the model out."""
