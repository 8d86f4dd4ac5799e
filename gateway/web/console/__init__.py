"""The ops console: the page (`console.html`) and its view endpoint (`view.py`)."""
