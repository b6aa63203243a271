"""Write ``data/mcqa_demo.jsonl``: 56 four-option science / general-knowledge questions.

    .venv/bin/python data/make_mcqa_demo.py

The questions were written for this repository (school-level facts a small model knows only in
part). Each entry below lists the correct option first; the file places it at position ``i % 4``
of question ``i`` (the other options keep their order), so every letter is the answer of 14
questions and "always A" scores exactly 25%. Rerunning rewrites the same bytes.
"""

from __future__ import annotations

import json
from pathlib import Path

# (subject, question, correct option, three wrong options)
QUESTIONS: list[tuple[str, str, str, list[str]]] = [
    ("physics", "What is the SI unit of force?", "Newton", ["Joule", "Watt", "Pascal"]),
    ("physics", "Which of these travels fastest in a vacuum?", "Light", ["Sound", "A thrown ball", "Wind"]),
    ("physics", "What force pulls objects toward the center of the Earth?", "Gravity",
     ["Magnetism", "Friction", "Tension"]),
    ("physics", "What is the approximate speed of light in a vacuum?", "300,000 km per second",
     ["300 km per second", "3,000 km per second", "3,000,000 km per second"]),
    ("physics", "Which quantity is measured in volts?", "Electric potential difference",
     ["Electric current", "Electric resistance", "Electric charge"]),
    ("physics", "At sea level, at what temperature does pure water boil?", "100 °C", ["50 °C", "150 °C", "200 °C"]),
    ("physics", "Which form of energy does a moving car have because of its motion?", "Kinetic energy",
     ["Nuclear energy", "Chemical energy", "Elastic energy"]),
    ("physics", "At sea level, at what temperature does pure water freeze?", "0 °C", ["-10 °C", "32 °C", "100 °C"]),
    ("physics", "What do solar panels turn sunlight into?", "Electrical energy",
     ["Sound energy", "Nuclear energy", "Chemical energy"]),
    ("physics", "Sound cannot travel through which of these?", "A vacuum", ["Water", "Steel", "Air"]),
    ("chemistry", "What is the chemical symbol for gold?", "Au", ["Ag", "Gd", "Go"]),
    ("chemistry", "What is the chemical formula of water?", "H2O", ["CO2", "NaCl", "O2"]),
    ("chemistry", "What is the pH of pure water at 25 °C?", "7", ["1", "10", "14"]),
    ("chemistry", "Which element has atomic number 1?", "Hydrogen", ["Helium", "Oxygen", "Carbon"]),
    ("chemistry", "Table salt is mostly which compound?", "Sodium chloride",
     ["Calcium carbonate", "Potassium nitrate", "Sodium bicarbonate"]),
    ("chemistry", "Which of these is a noble gas?", "Neon", ["Nitrogen", "Chlorine", "Sodium"]),
    ("chemistry", "Which metal is a liquid at room temperature?", "Mercury", ["Iron", "Aluminium", "Copper"]),
    ("chemistry", "What is the most abundant gas in Earth's atmosphere?", "Nitrogen",
     ["Oxygen", "Argon", "Carbon dioxide"]),
    ("biology", "Which organelle is known as the powerhouse of the cell?", "Mitochondrion",
     ["Nucleus", "Ribosome", "Golgi apparatus"]),
    ("biology", "Which molecule carries the genetic information of most living things?", "DNA",
     ["ATP", "Glucose", "Cholesterol"]),
    ("biology", "What do red blood cells carry around the body?", "Oxygen", ["Insulin", "Bile", "Saliva"]),
    ("biology", "Which organ pumps blood through the human body?", "Heart", ["Liver", "Lungs", "Kidney"]),
    ("biology", "How many chromosomes are in a typical human body cell?", "46", ["23", "64", "12"]),
    ("biology", "What is the largest organ of the human body?", "Skin", ["Heart", "Brain", "Liver"]),
    ("biology", "Which part of a plant absorbs most of its water from the soil?", "Roots",
     ["Leaves", "Flowers", "Stem"]),
    ("biology", "Animals that eat only plants are called what?", "Herbivores",
     ["Carnivores", "Omnivores", "Decomposers"]),
    ("biology", "Which blood vessels carry blood away from the heart?", "Arteries",
     ["Veins", "Capillaries", "Lymph ducts"]),
    ("biology", "Which gas do plants absorb from the air for photosynthesis?", "Carbon dioxide",
     ["Oxygen", "Nitrogen", "Helium"]),
    ("biology", "Which gas do plants release during photosynthesis?", "Oxygen",
     ["Carbon dioxide", "Methane", "Hydrogen"]),
    ("biology", "Which vitamin does human skin make when exposed to sunlight?", "Vitamin D",
     ["Vitamin A", "Vitamin C", "Vitamin K"]),
    ("astronomy", "Which planet is closest to the Sun?", "Mercury", ["Venus", "Earth", "Mars"]),
    ("astronomy", "What is the largest planet in our solar system?", "Jupiter", ["Saturn", "Neptune", "Earth"]),
    ("astronomy", "Which planet is known as the Red Planet?", "Mars", ["Venus", "Jupiter", "Uranus"]),
    ("astronomy", "What is the star at the center of our solar system?", "The Sun",
     ["Sirius", "Polaris", "Alpha Centauri"]),
    ("astronomy", "How long does the Earth take to orbit the Sun once?", "One year",
     ["One day", "One month", "Ten years"]),
    ("astronomy", "What is the name of the natural satellite that orbits the Earth?", "The Moon",
     ["Titan", "Europa", "Phobos"]),
    ("astronomy", "What causes the phases of the Moon?",
     "The Moon's changing position relative to the Sun and the Earth",
     ["Clouds passing in front of the Moon", "The Moon changing its size", "The Sun switching off at night"]),
    ("earth science", "What type of rock forms when lava cools and hardens?", "Igneous",
     ["Sedimentary", "Metamorphic", "Fossil"]),
    ("earth science", "What is the hardest natural mineral?", "Diamond", ["Quartz", "Talc", "Gold"]),
    ("earth science", "Which layer of the Earth do we live on?", "The crust",
     ["The inner core", "The mantle", "The outer core"]),
    ("earth science", "Which instrument measures air pressure?", "Barometer",
     ["Thermometer", "Anemometer", "Hygrometer"]),
    ("earth science", "Which process turns liquid water into water vapor?", "Evaporation",
     ["Condensation", "Freezing", "Precipitation"]),
    ("earth science", "How many continents are there on Earth?", "Seven", ["Five", "Six", "Eight"]),
    ("mathematics", "What is 7 multiplied by 8?", "56", ["54", "58", "64"]),
    ("mathematics", "What is the square root of 81?", "9", ["7", "8", "10"]),
    ("mathematics", "How many sides does a hexagon have?", "6", ["5", "7", "8"]),
    ("mathematics", "What is the sum of the interior angles of a triangle?", "180 degrees",
     ["90 degrees", "270 degrees", "360 degrees"]),
    ("mathematics", "What is 15% of 200?", "30", ["15", "20", "45"]),
    ("mathematics", "Which of these numbers is prime?", "13", ["9", "15", "21"]),
    ("mathematics", "What is the value of pi rounded to two decimal places?", "3.14", ["3.41", "2.71", "1.62"]),
    ("mathematics", "What is 2 to the power of 5?", "32", ["10", "16", "25"]),
    ("computer science", "How many bits are in one byte?", "8", ["4", "16", "32"]),
    ("computer science", "Which number system uses only the digits 0 and 1?", "Binary",
     ["Decimal", "Hexadecimal", "Octal"]),
    ("computer science", "What does CPU stand for?", "Central Processing Unit",
     ["Computer Power Unit", "Core Program Utility", "Central Peripheral Unit"]),
    ("computer science", "Which data structure works on a first-in, first-out basis?", "Queue",
     ["Stack", "Tree", "Hash table"]),
    ("computer science", "What is the binary number 101 in decimal?", "5", ["3", "6", "10"]),
]
LETTERS = "ABCD"


def rows() -> list[dict]:
    out = []
    for i, (subject, question, correct, wrong) in enumerate(QUESTIONS):
        gold = i % 4
        choices = list(wrong)
        choices.insert(gold, correct)
        out.append({"subject": subject, "question": question, "choices": choices, "answer": LETTERS[gold]})
    return out


def main() -> None:
    path = Path(__file__).resolve().parent / "mcqa_demo.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for row in rows():
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {len(QUESTIONS)} questions to {path}")


if __name__ == "__main__":
    main()
