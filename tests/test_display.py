"""Answers are shown with no active images or tags, and edits read back what was typed."""

import pytest

from ui.display import as_typed, shown

HOSTILE = [
    "![pixel](https://tracker.example/p.png) and ![ref][1]\n\n[1]: https://tracker.example/q.png",
    '<img src="https://tracker.example/p.png"> <IMG SRC=x onerror=alert(1)> </div> <!-- c --> <?php',
    "a < b and b > c, x<-1, <3",
    "```html\n<img src=https://e/x.png>\n![a](b)\n```\n`![c](d)` after ![e](f)",
    "streaming ```\n<img src=https://e/x.png",
]


@pytest.mark.parametrize("text", HOSTILE)
def test_images_and_tags_are_escaped_outside_code_and_come_back_as_typed(text):
    out = shown(text)
    assert as_typed(out) == text
    outside = out.split("```")[0::2]
    assert not any("![" in part.replace("`![c](d)`", "") for part in outside)
    assert "<img" not in out.split("```")[0].lower().replace("\\<img", "")


def test_code_is_left_alone():
    text = "```html\n<img src=x>\n![a](b)\n```\nuse `vec![1]` or `<br>`"
    assert shown(text) == text
    assert shown("a < b, x<-1") == "a < b, x<-1"
