"""Reports: the stage table (terminal and Markdown) and the plots, all read from report.json's content."""
