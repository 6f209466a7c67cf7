"""pytest-quantvla: the pytest plugin. Registered through the pytest11 entry point `quantvla`."""
