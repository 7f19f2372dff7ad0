pytest_plugins = ["optitool.testing"]
