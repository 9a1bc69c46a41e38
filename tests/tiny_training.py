"""The config overrides of a tiny training run (seconds on a CPU), shared by the training, store and
tracking tests; each test adds its data paths, sizes and output folder."""

TINY = (
    "model.channels=[4,8]", "model.latent_channels=2", "data.patch_size=32", "data.min_size=32",
    "optim.batch_size=4", "data.val_slices=2", "data.val_max_size=64", "optim.lr=0.003",
    "corruption.recipe=boxes", "corruption.val_recipe=boxes", "loss.warmup_steps=10", "threads=1",
)
