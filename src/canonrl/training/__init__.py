"""Trainer-side functionals: what a trainer does around the advantages, as pure functions and small registries.

- `losses`: the policy-gradient losses' formulas (PPO-clip, Clip-Cov, KL-Cov), loss aggregation, the KL penalty;
- `policy_losses`: the registry a trainer picks its policy loss from (`get_loss`), with each loss's parameters;
- `turn_losses`: ST-PPO's turn-level ratio and EPO's entropy regulariser for multi-turn agents;
- `selection`: which rows and tokens train (DAPO's dynamic sampling, D^3S, PivotRL's pivots);
- `prompt_sampling`: which prompts a step draws (uniform or VADE over a pool);
- `shaping`: reward shaping before the advantages (DAPO's overlong penalty).

None of them imports a trainer; the lab and the integrations use them.
"""
