"""Facial Action Unit vocabulary: AU sets, FACS names, prompt phrases, emotion prototypes.

Sources: FACS (Ekman & Friesen), the DISFA/BP4D AU sets and EMFACS prototypes as summarised in
`shared/reference/au-conventions.md`. The AU set of a build is configuration (a checkpoint declares its
own ordered list); this module only knows the words for each AU.
"""

from __future__ import annotations

DISFA12: tuple[str, ...] = ("AU1", "AU2", "AU4", "AU5", "AU6", "AU9", "AU12", "AU15", "AU17", "AU20", "AU25", "AU26")
BP4D12: tuple[str, ...] = ("AU1", "AU2", "AU4", "AU6", "AU7", "AU10", "AU12", "AU14", "AU15", "AU17", "AU23", "AU24")

FACS_NAMES: dict[str, str] = {
    "AU1": "Inner Brow Raiser", "AU2": "Outer Brow Raiser", "AU4": "Brow Lowerer", "AU5": "Upper Lid Raiser",
    "AU6": "Cheek Raiser", "AU7": "Lid Tightener", "AU9": "Nose Wrinkler", "AU10": "Upper Lip Raiser",
    "AU12": "Lip Corner Puller", "AU14": "Dimpler", "AU15": "Lip Corner Depressor", "AU17": "Chin Raiser",
    "AU20": "Lip Stretcher", "AU23": "Lip Tightener", "AU24": "Lip Pressor", "AU25": "Lips Part", "AU26": "Jaw Drop",
}

# What the face shows for each AU, in the MIFA prompt style; {adv} takes the intensity adverb.
AU_PHRASES: dict[str, str] = {
    "AU1": "{adv} raised inner brows", "AU2": "{adv} raised outer brows", "AU4": "{adv} lowered, knitted brows",
    "AU5": "{adv} widened upper eyelids", "AU6": "{adv} raised cheeks", "AU7": "{adv} tightened eyelids",
    "AU9": "a {adv} wrinkled nose", "AU10": "a {adv} raised upper lip", "AU12": "{adv} pulled-up lip corners",
    "AU14": "{adv} dimpled cheeks", "AU15": "{adv} lowered lip corners", "AU17": "a {adv} raised chin",
    "AU20": "{adv} stretched lips", "AU23": "{adv} tightened lips", "AU24": "{adv} pressed lips",
    "AU25": "{adv} parted lips", "AU26": "a {adv} dropped jaw",
}

# FACS intensity letters A..E are 1..5; the adverb for each in generated descriptions.
INTENSITY_ADVERBS: dict[int, str] = {1: "faintly", 2: "slightly", 3: "moderately", 4: "strongly", 5: "extremely"}
INTENSITY_ADJECTIVES: dict[int, str] = {1: "faint", 2: "slight", 3: "moderate", 4: "strong", 5: "intense"}

# EMFACS prototypes (AU -> typical FACS intensity), with the expression noun used in prompts.
EMOTION_PROTOTYPES: dict[str, dict[str, int]] = {
    "happiness": {"AU6": 3, "AU12": 4, "AU25": 2},
    "sadness": {"AU1": 3, "AU4": 2, "AU15": 3},
    "surprise": {"AU1": 4, "AU2": 4, "AU5": 2, "AU26": 4},
    "fear": {"AU1": 3, "AU2": 3, "AU4": 3, "AU5": 3, "AU20": 3, "AU26": 3},
    "anger": {"AU4": 4, "AU5": 3, "AU7": 3, "AU23": 3},
    "disgust": {"AU9": 4, "AU10": 3, "AU15": 2},
}
EMOTION_NOUNS: dict[str, str] = {
    "happiness": "smile", "sadness": "sad expression", "surprise": "surprised expression",
    "fear": "fearful expression", "anger": "angry frown", "disgust": "look of disgust",
}


def describe_aus(intensities: dict[str, int]) -> str:
    """'moderately raised cheeks, a slightly wrinkled nose' for the AUs with intensity >= 1, in the given order."""
    return ", ".join(AU_PHRASES[au].format(adv=INTENSITY_ADVERBS[int(v)]) for au, v in intensities.items() if v >= 1)
