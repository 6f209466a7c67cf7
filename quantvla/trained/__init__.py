"""The small trained policies' pipeline: expert demos (DART noise) and flow-matching behaviour
cloning. It builds on quantvla.eval (the simulator runner, the scripted expert) and quantvla.policy
(adapters, bundles); neither depends on it."""
