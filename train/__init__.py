"""The MVDiffusion++ training recipe: data, configs, MVAE and UNet training on accelerate."""
