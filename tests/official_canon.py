"""A plain transcription of the official CANON advantage loop (biuboomc/CANON, core_algos.py), as the spec
(../shared/specs/canon.md §1.3) describes it: per-response Python loops, ``sorted`` by the metric ascending, the
high half from position n // 2 on, half means by ``torch.mean``, singleton means 0, division by Z. Used only as a
test oracle; the entropy and length variants differ in where alpha goes."""

from collections import defaultdict

import torch


def official_canon(rewards, uids, metric, *, mu, alpha=1.0, variant="length", z=1.0):
    by_group = defaultdict(list)
    for i, uid in enumerate(uids):
        by_group[uid].append(i)
    high_mean, low_mean, in_high = {}, {}, {}
    for uid, rows in by_group.items():
        ordered = sorted(rows, key=lambda i: metric[i])
        mid = len(ordered) // 2
        low, high = ordered[:mid], ordered[mid:]
        for i in low:
            in_high[i] = False
        for i in high:
            in_high[i] = True
        if len(rows) == 1:
            high_mean[uid] = low_mean[uid] = torch.tensor(0.0)
        else:
            high_mean[uid] = torch.mean(torch.stack([rewards[i] for i in high]))
            low_mean[uid] = torch.mean(torch.stack([rewards[i] for i in low]))
    out = torch.zeros(len(uids))
    for i, uid in enumerate(uids):
        r, m_h, m_l = rewards[i], high_mean[uid], low_mean[uid]
        if variant == "entropy":
            if in_high[i]:
                a = mu * (r - alpha * m_l) + (1 - mu) * (r - m_h)
            else:
                a = mu * (alpha * r - m_h) + (1 - mu) * (r - m_l)
        else:
            if in_high[i]:
                a = mu * (alpha * r - m_l) + (1 - mu) * (r - m_h)
            else:
                a = mu * (r - alpha * m_h) + (1 - mu) * (r - m_l)
        out[i] = a / z
    return out
