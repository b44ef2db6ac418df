"""`bigft data`: what the data pipeline makes of a config's data (preview), preparing it
ahead of a run (prepare), and clearing old preparations out of the store (prune)."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from bigft.commands.common import (
    CONFIG_ARG,
    OVERRIDES_ARG,
    checked_overrides,
    out,
    quiet_libraries,
    user_errors,
)
from bigft.errors import BigftError

data_app = typer.Typer(help="Inspect what the data pipeline makes of a config's data.")


@data_app.command("preview")
@user_errors
def data_preview(
    config: Path = CONFIG_ARG,
    overrides: list[str] | None = OVERRIDES_ARG,
    num: int = typer.Option(3, "--num", "-n", help="Examples to show."),
) -> None:
    """Show formatted + tokenized examples (masked prompt dimmed) and data statistics."""
    from bigft.config_io import load_config

    if num < 1:
        raise BigftError(f"--num {num}: show at least 1 example")

    cfg = load_config(config, checked_overrides(overrides))
    quiet_libraries()
    if cfg.task in ("image_classification", "contrastive"):
        from bigft.data.images import prepare_images, preview_images

        return preview_images(*prepare_images(cfg), cfg, out, num)
    from bigft.data import prepare_data
    from bigft.data.preview import preview
    from bigft.demo import demo_base_for_preview
    from bigft.model.load import load_tokenizer

    with demo_base_for_preview(config, cfg, out) as cfg:
        tokenizer = load_tokenizer(cfg.model)
    prepared = prepare_data(cfg.data, tokenizer, cfg.train.seq_len, cfg.train.seed)
    preview(prepared, tokenizer, out, n=num)


@data_app.command("prepare")
@user_errors
def data_prepare(config: Path = CONFIG_ARG, overrides: list[str] | None = OVERRIDES_ARG) -> None:
    """Tokenize, mask, clean and split the config's data once, into the prepared-data
    store (data.prepared_dir) where `bigft train` finds it; processes started together
    prepare once and share it."""
    from bigft.config_io import load_config

    cfg = load_config(config, checked_overrides(overrides))
    if not cfg.data.cache:
        raise BigftError("data.cache is false: nothing is kept to prepare (set data.cache=true)")
    quiet_libraries()
    from bigft.data.prepared import preparation_text, prepared_for_task
    from bigft.data.preview import removal_report, stats_table
    from bigft.model.load import load_preprocessor

    tokenizer = load_preprocessor(cfg)
    prepared, _, preparation = prepared_for_task(cfg, tokenizer)
    out.print(stats_table(prepared))
    for name, stats in prepared.stats.splits.items():
        for line in removal_report(name, stats):
            out.print(line, soft_wrap=True)
    out.print(preparation_text(preparation), highlight=False, soft_wrap=True)


@data_app.command("prune")
@user_errors
def data_prune(
    config: Path | None = typer.Argument(
        None,
        help="A config whose data.prepared_dir is the store (default: the default store).",
        show_default=False,
    ),
    overrides: list[str] | None = OVERRIDES_ARG,
    store: Path | None = typer.Option(None, "--store", help="The store folder itself."),
    unused_days: float = typer.Option(
        30.0, "--unused-days", help="Remove preparations no run has used for this many days."
    ),
    yes: bool = typer.Option(False, "--yes", help="Remove them (without it: only list)."),
) -> None:
    """List the prepared-data store's preparations (size, sources, last use) and remove
    those no run has used for --unused-days; only folders bigft wrote are touched."""
    from bigft.data.prepared import store_dir
    from bigft.data.store import list_store, prune, stale

    if unused_days < 0:
        raise BigftError(f"--unused-days {unused_days:g}: give 0 or more days")
    if config is not None and store is not None:
        raise BigftError("give a CONFIG or --store DIR, not both")
    if store is None:
        from bigft.config import DataConfig
        from bigft.config_io import load_config

        data = (
            load_config(config, checked_overrides(overrides)).data
            if config is not None
            else DataConfig(train="unused")
        )
        store = store_dir(data)
    listing = list_store(store.expanduser())
    now = time.time()
    old = {e.path for e in stale(listing, unused_days, now)}
    for entry in listing.entries:
        mark = "remove" if entry.path in old else "locked" if entry.locked else "keep"
        out.print(
            f"{mark:6} {entry.path.name}  {entry.size_bytes / 2**20:,.1f} MiB  "
            f"last used {entry.idle_days(now):.1f} days ago  {', '.join(entry.sources)}",
            highlight=False,
            soft_wrap=True,
        )
    for path in listing.skipped:
        out.print(f"skip   {path.name} (not a bigft preparation)", highlight=False)
    freed = sum(e.size_bytes for e in listing.entries if e.path in old) / 2**20
    if not yes:
        out.print(
            f"{listing.root}: {len(old)} of {len(listing.entries)} preparation(s), "
            f"{freed:,.1f} MiB, unused for {unused_days:g} days or more; "
            "run again with --yes to remove them",
            highlight=False,
            soft_wrap=True,
        )
        return
    removed = prune(listing, unused_days, now)
    out.print(
        f"{listing.root}: removed {len(removed)} preparation(s), {freed:,.1f} MiB",
        highlight=False,
        soft_wrap=True,
    )
