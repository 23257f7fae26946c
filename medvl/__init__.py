"""medvl: build general medical vision-language models end to end.

Research use only: nothing medvl trains or prints is a medical device or a diagnosis.
"""

__version__ = "0.1.0"

RESEARCH_ONLY = "For research use only. Not for diagnosis or treatment decisions."
