"""The QLoRA trainer (`trainer.train_job`), its pure planning (`plan`), checkpoints and `publish`.

Heavy imports (torch, transformers, peft, deepspeed) happen inside functions, so importing this
package is cheap.
"""
