"""Procedural FACS face renderer: the teacher with exact AU labels. Shares no code with the student model."""
