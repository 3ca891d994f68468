"""``vold-pl``: the LightningCLI entry point (fit / validate / test / predict).

Every option comes from a typed signature and its docstring, so ``vold-pl fit --help`` documents them all
and ``vold-pl fit --config configs/quickstart/sft_student.yaml --print_config`` shows a whole run.
"""

from __future__ import annotations

import os

from lightning.pytorch.cli import LightningCLI

from vold_pl.data.datamodule import ReasoningDataModule


class VoldCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # The data module's MixedSampler splits draws across ranks itself; Lightning must not wrap it.
        parser.set_defaults({"seed_everything": 0, "trainer.use_distributed_sampler": False})


def main(args: list[str] | None = None) -> None:
    # Model and data hubs are never needed for local folders; keep libraries from phoning home.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    VoldCLI(
        model_class=None,
        datamodule_class=ReasoningDataModule,
        subclass_mode_model=True,
        save_config_kwargs={"overwrite": True},
        args=args,
        auto_configure_optimizers=False,
    )


if __name__ == "__main__":
    main()
