"""Charts and tables of the study's findings stages (bench/findings.py), from its record; called by
bench/plots.py, which writes docs/cifar10_<stage>.png for head_long, color_long, batch, width."""

from __future__ import annotations

import numpy as np

H_KEY = 'linear_top_1_accuracy'


def _probe(study: dict, key: str) -> dict:
    return study.get(key, {}).get('result', {})


def arms(study: dict, stage: str) -> list[dict]:
    """The stage's arms with their results: probe of h ('h'), of z ('z'), the head trained
    alongside ('alongside'), supervised top-1 ('supervised')."""
    found = []
    for run, arm in study.get('findings', {}).get(stage, {}).items():
        arm = dict(arm)
        if arm.get('supervised'):
            result = study.get(run, {}).get('result', {})
            arm['supervised_top_1'] = result.get('eval/label_top_1_accuracy')
        for part in ('h', 'z'):
            if part in arm:
                arm[part] = _probe(study, arm[part])
        if 'alongside' in arm:
            arm['alongside'] = study.get(arm['alongside'], {}).get('result', {})
        arm['minutes'] = study.get(run, {}).get('wall_minutes')
        found.append(arm)
    return found


def spread(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return '–'
    if len(values) == 1:
        return f'{values[0]:.3f}'
    return f'{np.mean(values):.3f} ± {(max(values) - min(values)) / 2:.3f}'


def head_table(study: dict) -> list[str]:
    rows = ['| head | h: linear probe | h: kNN k=20 centred | z: linear probe | '
            'linear head trained alongside | seeds |', '|---|---|---|---|---|---|']
    for head in ('none', 'linear', 'nonlinear2', 'nonlinear3'):
        found = [a for a in arms(study, 'head_long') if a['head'] == head]
        get = lambda part, key: [a.get(part, {}).get(key) for a in found]  # noqa: E731
        rows.append(f'| {head} | {spread(get("h", H_KEY))} | '
                    f'{spread(get("h", "knn20_centred_top_1_accuracy"))} | '
                    f'{spread(get("z", H_KEY)) if head != "none" else "(= h)"} | '
                    f'{spread(get("alongside", "eval/label_top_1_accuracy"))} | '
                    f'{len([a for a in found if a.get("h")])} |')
    return rows


def plot_head(study: dict, path: str) -> None:
    import matplotlib.pyplot as plt
    heads = ('none', 'linear', 'nonlinear2', 'nonlinear3')
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    for offset, (part, key, label) in zip((-0.27, 0, 0.27), (
            ('h', H_KEY, 'h, linear probe'), ('z', H_KEY, 'z, linear probe'),
            ('alongside', 'eval/label_top_1_accuracy', 'linear head trained alongside'))):
        means = []
        for i, head in enumerate(heads):
            values = [a.get(part, {}).get(key) for a in arms(study, 'head_long')
                      if a['head'] == head]
            values = [v for v in values if v is not None]
            means.append(np.mean(values) if values else np.nan)
            ax.scatter([i + offset] * len(values), values, c='k', s=8, zorder=3)
        ax.bar(np.arange(len(heads)) + offset, means, 0.26, label=label)
    ax.set_xticks(range(len(heads)), ['none', 'linear', 'nonlinear\n(2 layers)',
                                      'nonlinear\n(3 layers)'])
    low = np.nanmin([a.get('h', {}).get(H_KEY, np.nan) for a in arms(study, 'head_long')] or [0])
    ax.set_ylim(max(0.0, low - 0.1), None)
    ax.set_ylabel('CIFAR-10 test top-1')
    seeds = sorted({a['seed'] for a in arms(study, 'head_long') if a.get('h')})
    ax.set_title(f'Projection head, 8 epochs, seed {", ".join(map(str, seeds))} (dots)',
                 fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def batch_table(study: dict) -> list[str]:
    found = arms(study, 'batch')
    rows = ['| epochs | batch 128 | batch 256 | batch 512 |', '|---|---|---|---|']
    for epochs in sorted({a['epochs'] for a in found}):
        cells = [spread([a.get('h', {}).get(H_KEY) for a in found
                         if a['epochs'] == epochs and a['batch'] == b]) for b in (128, 256, 512)]
        rows.append(f'| {epochs} | ' + ' | '.join(cells) + ' |')
    return rows


def plot_batch(study: dict, path: str) -> None:
    import matplotlib.pyplot as plt
    found = arms(study, 'batch')
    fig, ax = plt.subplots(figsize=(5.2, 3.4))
    for epochs in sorted({a['epochs'] for a in found}):
        xs, ys = [], []
        for b in (128, 256, 512):
            values = [a['h'][H_KEY] for a in found if a['epochs'] == epochs
                      and a['batch'] == b and a.get('h')]
            ax.scatter([b] * len(values), values, c='k', s=8, zorder=3)
            if values:
                xs.append(b)
                ys.append(np.mean(values))
        ax.plot(xs, ys, marker='o', label=f'{epochs} epochs')
    ax.set_xscale('log', base=2)
    ax.set_xticks([128, 256, 512], ['128', '256', '512'])
    ax.set_xlabel('batch size (LARS lr 1.0 x B/256)')
    ax.set_ylabel('linear probe on h, test top-1')
    ax.set_title('Batch size x training length (Figure 9)', fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def encoder_parameters(width: float) -> int:
    """Parameters of the study's ResNet-18 (CIFAR stem) at `width`: h's network alone."""
    from simclr_tf.config import Config
    from simclr_tf.resnet import resnet_from_config
    config = Config(resnet_depth=18, width_multiplier=width, image_size=32, use_tpu=False)
    encoder = resnet_from_config(config)
    encoder.build((None, 32, 32, 3))
    return int(sum(np.prod(v.shape) for v in encoder.trainable_variables))


def width_rows(study: dict) -> list[tuple[float, int, dict, dict]]:
    found = arms(study, 'width')
    rows = []
    for w in sorted({a['width'] for a in found}):
        simclr = next((a for a in found if a['width'] == w and not a['supervised']), {})
        supervised = next((a for a in found if a['width'] == w and a['supervised']), {})
        rows.append((w, encoder_parameters(w), simclr, supervised))
    return rows


def width_table(study: dict) -> list[str]:
    rows = ['| width | encoder parameters | SimCLR, linear probe on h | supervised, test top-1 | '
            'gap |', '|---|---|---|---|---|']
    for w, params, simclr, supervised in width_rows(study):
        s = simclr.get('h', {}).get(H_KEY)
        t = supervised.get('supervised_top_1')
        gap = f'{t - s:.3f}' if s is not None and t is not None else '–'
        rows.append(f'| x{w:g} | {params / 1e6:.2f} M | {spread([s])} | {spread([t])} | {gap} |')
    return rows


def plot_width(study: dict, path: str) -> None:
    import matplotlib.pyplot as plt
    rows = width_rows(study)
    params = [r[1] for r in rows]
    simclr = [r[2].get('h', {}).get(H_KEY, np.nan) for r in rows]
    supervised = [r[3].get('supervised_top_1', np.nan) for r in rows]
    fig, (ax, gap) = plt.subplots(1, 2, figsize=(9, 3.4))
    ax.plot(params, supervised, marker='o', label='supervised')
    ax.plot(params, simclr, marker='o', label='SimCLR, linear probe on h')
    gap.plot(params, np.array(supervised) - np.array(simclr), marker='o', c='C3')
    for a, title in ((ax, 'test top-1, 8 epochs each'), (gap, 'supervised minus SimCLR')):
        a.set_xscale('log')
        a.minorticks_off()
        a.set_xticks(params, [f'{p / 1e6:.2f} M' for p in params])
        a.set_xlabel('encoder parameters')
        a.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.suptitle('Model width (Figure 7): widths x' + ', x'.join(f'{r[0]:g}' for r in rows),
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def color_table(study: dict) -> list[str]:
    found = arms(study, 'color_long')
    rows = ['| colour strength | h: linear probe | h: kNN k=20 centred | seeds |', '|---|---|---|---|']
    for c in (0.5, 1.0):
        here = [a for a in found if a['color'] == c]
        rows.append(f'| {c:g} | {spread([a.get("h", {}).get(H_KEY) for a in here])} | '
                    f'{spread([a.get("h", {}).get("knn20_centred_top_1_accuracy") for a in here])}'
                    f' | {len(here)} |')
    return rows


TABLES = {'head_long': (head_table, plot_head), 'color_long': (color_table, None),
          'batch': (batch_table, plot_batch), 'width': (width_table, plot_width)}
