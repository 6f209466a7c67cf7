"""A model as a LIBERO policy, in one place: the runner's policy protocol (ModelPolicy), the
adapters from observations to model inputs and from action chunks to actions (camera images:
adapters; object-state tokens: state), and trained-policy bundles on disk (bundle).

The runner (quantvla.eval.libero) asks a policy for `needs_images`, `reset()` and
`infer(obs, instruction) -> [T, 7] actions`. Everything family-specific comes from the family's
record in quantvla.families."""
