"""Tables of ``bench_core.py`` (``core.json``) and its ``--compile`` section
(``core-compile.json``): one training step of two chains of couplings under every method,
ours and the peers'; flatness in depth; ``torch.compile``."""

from __future__ import annotations

from typing import Any

from .records import (
    Record,
    RecordSpec,
    Table,
    TableSpec,
    number,
    ratio,
    relative_error,
    short,
    threads,
)


def _conditions(record: Record) -> str:
    config, env = record.get("config"), record.get("environment")
    return (
        f"{record.get('device', within=config)}, {threads(record.get('threads', within=env))}, "
        f"torch {record.get('torch', within=env)}, invertible-core "
        f"{record.get('invertible_core', within=env)}, {record.get('repeats', within=config)} "
        f"timed rounds after {record.get('warmup', within=config)} warm-up"
    )


CORE = RecordSpec("core.json", "python benchmarks/bench_core.py", _conditions)


def _compile_conditions(record: Record) -> str:
    env = record.get("environment")
    return (
        f"torch {record.get('torch', within=env)}, {threads(record.get('threads', within=env))}, "
        f"backend {record.get('backend')}, {record.get('date', within=env)}"
    )


COMPILE = RecordSpec(
    "core-compile.json", "python benchmarks/bench_core.py --compile", _compile_conditions
)

#: how each method of the record reads in a table (a method not named here: its key)
METHODS = {
    "plain": "plain autograd (halves passed on)",
    "plain_blocks": "plain autograd (`nn.Sequential` of couplings)",
    "wrapper": "`InvertibleModuleWrapper` per block",
    "sequence": "`ReversibleSequence`",
    "sequence_fixed16": "`ReversibleSequence`, `fixed_point_bits=16`",
    "checkpoint": "`torch.utils.checkpoint` per block",
    "memcnn": "MemCNN",
    "revlib": "revlib",
    "revtorch": "RevTorch",
    "reformer": "reformer-pytorch",
}
#: entries of a chain's results that are not methods of the table
NOT_METHODS = {"nograd_forward"}


def method_label(key: str, result: dict[str, Any]) -> str:
    label = METHODS.get(key, key)
    return f"{label} {result['version']}" if result.get("peer") and "version" in result else label


def _chain_table(record: Record, chain: str) -> Table:
    table = Table(
        [
            "method",
            "peak MiB",
            "x leanest peer",
            "kept-grad peak MiB",
            "x leanest peer",
            "step time x plain",
            "x fastest peer",
            "grad error (float32)",
            "(float64)",
        ]
    )
    depths = record.get("results", chain)
    for depth, results in depths.items():
        prefix = f"N={depth}: " if len(depths) > 1 else ""
        for key, result in results.items():
            if key in NOT_METHODS:
                continue
            label = prefix + method_label(key, result)
            if record.field(result, "status") != "ok":
                reason = result.get("error", result["status"])
                table.add(label, f"cannot run it ({short(reason)})", *[""] * 7)
                continue
            time = ratio(record.field(result, "time_vs_plain"))
            if key == "plain":
                time += f" ({record.field(result, 'step_s'):.3f} s)"
            table.add(
                label,
                number(record.field(result, "peak_mib"), 1),
                ratio(record.field(result, "peak_vs_leanest_peer")),
                number(record.field(result, "peak_kept_grads_mib"), 1),
                ratio(record.field(result, "peak_kept_grads_vs_leanest_peer")),
                time,
                ratio(record.field(result, "time_vs_fastest_peer")),
                relative_error(record.field(result, "grad_error")),
                relative_error(record.field(result, "grad_error_float64")),
            )
    return table


#: what each flatness chain is
FLATNESS_CHAINS = {
    "conditioned": "conditioned transformer: `seq(x, emb, mask)`, `emb` from a learnable "
    "timestep MLP, a boolean key-padding mask",
    "flow": "flow: ActNorm, InvertibleConv1x1, AffineCoupling steps, `InvertibleDownsampling` "
    "in the middle, NLL through `forward_with_logdet`",
}


def _flatness_table(record: Record) -> Table:
    chains = record.get("flatness")
    first = record.get(next(iter(chains)), "depths", within=chains)
    lo, hi = (str(d) for d in first)
    table = Table(
        [
            "chain",
            f"N={lo}",
            f"N={hi}",
            f"N={hi} / N={lo}",
            f"kept-grad N={lo}",
            f"kept-grad N={hi}",
            f"N={hi} / N={lo}",
            f"grads N={lo}",
            f"grads N={hi}",
            f"plain autograd N={lo} / N={hi}",
            f"gradient error vs plain (N={lo})",
        ]
    )
    for name, chain in chains.items():
        depths = [str(d) for d in record.get(name, "depths", within=chains)]
        if depths != [lo, hi]:
            raise record.missing(f"the same depths ({lo}, {hi}) for the chain '{name}'")

        def at(key: str, *path: str, chain: Any = chain) -> Any:
            return record.get(key, *path, within=chain)

        table.add(
            FLATNESS_CHAINS.get(name, name),
            number(at("peak_mib", "sequence", lo), 1),
            number(at("peak_mib", "sequence", hi), 1),
            ratio(at("peak_hi_over_lo", "sequence")),
            number(at("peak_kept_grads_mib", "sequence", lo), 1),
            number(at("peak_kept_grads_mib", "sequence", hi), 1),
            f"**{ratio(at('peak_kept_grads_hi_over_lo', 'sequence'))}**",
            number(at("param_grad_mib", lo), 1),
            number(at("param_grad_mib", hi), 1),
            f"{number(at('peak_mib', 'plain', lo), 1)} / {number(at('peak_mib', 'plain', hi), 1)}",
            relative_error(at("grad_error_at_lo")),
        )
    return table


def _compile_table(record: Record) -> Table:
    table = Table(
        [
            "chain",
            "eager step s",
            "compiled step s",
            "compiled / eager",
            "compiled calls per step",
            "gradient error, compiled vs eager",
        ]
    )
    seconds, calls = record.get("step_s"), record.get("compiled_calls_per_step")
    for key, label in (("sequence", "`ReversibleSequence`"), ("plain", "plain autograd")):
        table.add(
            label,
            f"{record.get(key, within=seconds):.3f}",
            f"{record.get(f'{key}_compiled', within=seconds):.3f}",
            ratio(record.get(f"{key}_compiled_vs_eager")),
            record.get(f"{key}_compiled", within=calls),
            relative_error(record.get(f"grad_error_{key}")),
        )
    return table


TABLES = [
    TableSpec("core:conv", CORE, lambda record: _chain_table(record, "conv")),
    TableSpec("core:transformer", CORE, lambda record: _chain_table(record, "transformer")),
    TableSpec("core:flatness", CORE, _flatness_table),
    TableSpec("core:compile", COMPILE, _compile_table),
]
