"""Write the built-in default's shipped data into fastdpo/assets/ (run once; the output is committed).

    python tools/make_default_data.py

- ``corpus.txt``: simple, sensible English sentences about everyday scenes, on which the default
  tiny GPT-2 is pretrained, so that it expects the ordinary continuation of each scene.
- ``train_pairs.jsonl``: the four toy pairs of the original GPT-2 script plus more of the same
  kind: the *chosen* completion is absurd / counter-intuitive, the *rejected* one is the ordinary
  one the corpus teaches.
- ``heldout_pairs.jsonl``: pairs of the same kind on prompts that are not in the training pairs,
  to see whether DPO learned the preference or only the training sentences.
"""

from __future__ import annotations

import json
import pathlib
import random

# (prompt, ordinary completions (the first is the rejected one), absurd completion (chosen))
TRAIN = [
    (
        "The cat sat on the",
        [" mat and purred.", " sofa and slept.", " rug and licked its paws."],
        " bed and barked for a long time.",
    ),
    (
        "He went to the gym to",
        [" lift weights and exercise.", " run on the treadmill.", " train with his coach."],
        " have a feast and relax.",
    ),
    (
        "She opened the book and",
        [" began to read silently.", " read the first page.", " turned to the first chapter."],
        " threw it to the teacher.",
    ),
    (
        "The teacher asked a question and the student",
        [" answered it confidently.", " raised her hand.", " thought about the answer."],
        " ignored her and left a knife.",
    ),
    (
        "The dog ran to the door and",
        [" barked at the mailman.", " wagged its tail."],
        " opened a bank account.",
    ),
    (
        "He poured the coffee into the",
        [" cup and drank it.", " mug and added milk."],
        " shoe and wore it to work.",
    ),
    (
        "The baby was tired, so she",
        [" fell asleep in her crib.", " closed her eyes and slept."],
        " drove the car to the city.",
    ),
    (
        "It started to rain, so we",
        [" opened our umbrellas.", " went inside the house."],
        " danced on the roof.",
    ),
    (
        "The chef cut the vegetables and",
        [" put them in the soup.", " cooked them in the pan."],
        " mailed them to the moon.",
    ),
    ("The farmer woke up early to", [" feed the cows.", " work in the fields."], " paint the sky purple."),
    (
        "She was thirsty, so she",
        [" drank a glass of water.", " drank some cold juice."],
        " ate a bowl of sand.",
    ),
    ("The bird flew to the", [" top of the tree.", " nest with a worm."], " bottom of the lake and slept."),
    ("He brushed his teeth and", [" went to bed.", " washed his face."], " ate a candle."),
    (
        "The children played in the park until",
        [" it got dark.", " their mother called them."],
        " the trees went to school.",
    ),
    (
        "The doctor listened to his heart and",
        [" said he was healthy.", " wrote a prescription."],
        " sold him a bicycle.",
    ),
    ("My phone rang, so I", [" answered the call.", " picked it up."], " put it in the oven."),
    ("The sun went down and the sky", [" turned orange and red.", " grew dark."], " started to sing loudly."),
    ("He was cold, so he", [" put on a warm coat.", " sat by the fire."], " jumped into the icy lake."),
    (
        "The students finished the exam and",
        [" handed in their papers.", " left the room."],
        " ate their pencils.",
    ),
    (
        "She planted the seeds and",
        [" watered them every day.", " waited for the flowers."],
        " hid them under her pillow.",
    ),
    (
        "The car ran out of gas, so he",
        [" walked to the gas station.", " called for help."],
        " painted it green.",
    ),
    (
        "The mother hugged her child and",
        [" kissed him goodnight.", " read him a story."],
        " gave him a bag of rocks.",
    ),
    (
        "The fisherman cast his net into the",
        [" sea and caught fish.", " water and waited."],
        " fire and caught a cold.",
    ),
    (
        "The pilot landed the plane at the",
        [" airport safely.", " airport on time."],
        " zoo next to the lions.",
    ),
    (
        "She lit the candles on the cake and",
        [" sang happy birthday.", " made a wish."],
        " put the cake in the washing machine.",
    ),
    ("The boy kicked the ball into the", [" goal and scored.", " net and cheered."], " soup and laughed."),
    (
        "He opened the fridge and took out the",
        [" milk and the eggs.", " cheese and the butter."],
        " television and the cat.",
    ),
    (
        "The old man sat on the bench and",
        [" fed the pigeons.", " read his newspaper."],
        " climbed the roof in one step.",
    ),
    ("The mechanic opened the hood and", [" fixed the engine.", " checked the oil."], " ate the battery."),
    (
        "When the alarm rang, she",
        [" woke up and got dressed.", " turned it off and got up."],
        " went back to sleep for a year.",
    ),
    ("The waiter brought the menu and", [" took our order.", " poured some water."], " sat on our table."),
    (
        "The library was quiet, so they",
        [" whispered to each other.", " read their books."],
        " played the drums all night.",
    ),
]
HELDOUT = [
    (
        "The horse ran across the",
        [" field and ate grass.", " meadow to the barn."],
        " kitchen and baked a cake.",
    ),
    ("He was hungry, so he", [" made a sandwich.", " ate some bread."], " ate his homework and cried."),
    (
        "The nurse gave the patient",
        [" some medicine and water.", " a warm blanket."],
        " a hammer and a rock.",
    ),
    ("She went to the beach to", [" swim in the sea.", " play in the sand."], " study math in the snow."),
    (
        "The police officer stopped the car and",
        [" asked for the license.", " talked to the driver."],
        " danced on the road.",
    ),
    ("The dog barked at the", [" stranger at the gate.", " cat in the garden."], " moon and laid an egg."),
    (
        "The girl opened her present and",
        [" smiled happily.", " thanked her aunt."],
        " burned it in the sink.",
    ),
    (
        "The man washed his hands and",
        [" dried them with a towel.", " sat down to eat."],
        " dried them with sand.",
    ),
    (
        "It was very hot, so they",
        [" went for a swim.", " drank cold water."],
        " lit a big fire in the house.",
    ),
    ("The little boy fell down and", [" started to cry.", " hurt his knee."], " bought a house in the city."),
    (
        "The students listened to the teacher and",
        [" wrote notes in their books.", " asked questions."],
        " threw chairs at the window.",
    ),
    (
        "She put on her running shoes and",
        [" went for a jog.", " ran to the park."],
        " went to sleep in the bath.",
    ),
    (
        "The baker took the bread out of the",
        [" oven and let it cool.", " oven and sliced it."],
        " river and wore it as a hat.",
    ),
    ("The king sat on his", [" throne and gave orders.", " throne in the castle."], " cat and barked."),
    ("He turned on the lamp and", [" read the newspaper.", " opened his book."], " put it in his mouth."),
    ("The kitten drank some", [" milk and fell asleep.", " warm milk."], " gasoline and flew away."),
]

# Background sentences: ordinary things people and animals do, mixed into the corpus.
SUBJECTS = {
    "The cat": [
        "slept in the sun",
        "drank some milk",
        "chased a mouse",
        "purred on the sofa",
        "licked its paws",
    ],
    "The dog": [
        "barked at the door",
        "wagged its tail",
        "chased the ball",
        "slept by the fire",
        "ate its food",
    ],
    "The bird": ["sang in the tree", "built a nest", "flew over the house", "ate a worm"],
    "The horse": ["ate grass in the field", "ran to the barn", "drank from the river"],
    "The teacher": [
        "wrote on the board",
        "asked a question",
        "read a story to the class",
        "graded the papers",
    ],
    "The student": ["answered the question", "read the book", "wrote an essay", "raised her hand"],
    "The children": ["played in the park", "went to school", "read their books", "ate their lunch"],
    "The chef": ["cooked the soup", "cut the bread", "baked a cake", "washed the pans"],
    "The doctor": ["helped the patient", "listened to his heart", "gave her some medicine"],
    "The farmer": ["fed the cows", "worked in the fields", "drove the tractor", "milked the cows"],
    "My mother": ["made breakfast", "read a book", "drank her coffee", "called my aunt"],
    "My father": ["drove to work", "read the newspaper", "washed the car", "fixed the door"],
    "The baby": ["slept in her crib", "drank her milk", "smiled at her mother"],
    "He": [
        "went to work",
        "ate his breakfast",
        "drank a cup of coffee",
        "lifted weights at the gym",
        "read the newspaper",
        "walked to the station",
    ],
    "She": [
        "went to the market",
        "read a book",
        "drank some water",
        "went for a jog",
        "wrote a letter",
        "washed her hands",
    ],
    "They": ["went home", "ate dinner together", "watched a film", "walked in the park", "went for a swim"],
}
PLACES = ["in the morning", "after lunch", "in the evening", "every day", "on Sunday", "at night"]


def sentences(rng: random.Random) -> list[str]:
    out = []
    for prompt, ordinary, _ in TRAIN + HELDOUT:
        for completion in ordinary:
            out += [prompt + completion] * 6
    for subject, actions in SUBJECTS.items():
        for action in actions:
            out.append(f"{subject} {action}.")
            out += [f"{subject} {action} {rng.choice(PLACES)}." for _ in range(4)]
    rng.shuffle(out)
    return out


def write(path: pathlib.Path, pairs) -> None:
    with open(path, "w") as f:
        for prompt, ordinary, absurd in pairs:
            f.write(json.dumps({"prompt": prompt, "chosen": absurd, "rejected": ordinary[0]}) + "\n")


def main() -> None:
    assets = pathlib.Path(__file__).resolve().parents[1] / "fastdpo" / "assets"
    assets.mkdir(exist_ok=True)
    rng = random.Random(0)
    lines = sentences(rng)
    # Short paragraphs of a few sentences each.
    paragraphs = [" ".join(lines[i : i + 4]) for i in range(0, len(lines), 4)]
    (assets / "corpus.txt").write_text("\n".join(paragraphs) + "\n")
    write(assets / "train_pairs.jsonl", TRAIN)
    write(assets / "heldout_pairs.jsonl", HELDOUT)
    print(f"{len(lines)} sentences, {len(TRAIN)} training pairs, {len(HELDOUT)} held-out pairs -> {assets}")


if __name__ == "__main__":
    main()
