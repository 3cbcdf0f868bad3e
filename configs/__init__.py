"""Package data: configs/serve/*.yaml ships in the wheel as omni.configs and is found with importlib.resources."""
