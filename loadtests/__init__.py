"""Load tests of issue #5: Locust shoppers (`locustfile.py`) and the headless runner (`run.py`)."""
