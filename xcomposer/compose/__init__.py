"""Illustrated article composition: data model and export, model-output parsers, the pipeline."""
from .article import Article, Candidate, ImageSlot, safe_folder_name
from .parse import (evenly_spaced, fallback_caption, indexed_sections, parse_caption, parse_choice, parse_spotting,
                    split_paragraphs)
from .pipeline import Composer, Event, compose

__all__ = ["Article", "Candidate", "ImageSlot", "safe_folder_name", "evenly_spaced", "fallback_caption",
           "indexed_sections", "parse_caption", "parse_choice", "parse_spotting", "split_paragraphs", "Composer",
           "Event", "compose"]
