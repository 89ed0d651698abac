"""Refinement of the student's rollout by the teacher: the rewrite (trd), the splice (trd_splice), opd scoring."""
