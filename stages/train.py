"""train_cnn / train_resnet: train one model on the split, save it with its metadata."""

import argparse

from kneexray import stage
from kneexray.params import Params


def main(args: argparse.Namespace, params: Params) -> None:
    from kneexray.model.devices import is_chief  # TensorFlow loads after params are validated
    from kneexray.model.files import save_model
    from kneexray.model.training import train

    result = train(
        args.model,
        params,
        split_dir=args.split,
        data_root=args.data,
        live_dir=args.live,
        backup_dir=f".kneexray_backup/{args.model}",
    )
    save_model(result.model, result.metadata, args.out)
    stage.log.info(
        "%s: %d epochs, weights %s%s",
        args.model,
        result.epochs_run,
        result.metadata["weights_source"],
        f", saved {args.out}" if is_chief(result.model.distribute_strategy) else " (not the chief: nothing saved)",
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model", choices=["cnn", "resnet"])
    parser.add_argument("--split", required=True, help="split stage output folder")
    parser.add_argument("--data", required=True, help="extract stage output folder (image paths are relative to it)")
    parser.add_argument("--out", required=True, help="the .keras model file to write")
    parser.add_argument("--live", required=True, help="DVCLive folder for per-epoch metrics")
    stage.run(main, parser)
