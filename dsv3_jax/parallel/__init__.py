"""Parallelism: `mesh` (mesh, logical-axis rules, ZeRO-1 shardings), `expert_parallel` (all-to-all MoE dispatch),
`pipeline` / `stages` / `pipeline_exec` (pipeline schedules and their executor)."""
