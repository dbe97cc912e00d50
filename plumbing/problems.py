"""Built-in arithmetic word problems with step-by-step rationales (a data source that needs no download).

Each problem `{id, question, answer, rationale}` takes 1 to 3 operations among + - * /, in one of ten scenarios
(shopping, sharing, baking, garden, reading, travel, recipe, savings, tickets, collections) with varied names and
nouns; a seed always gives the same distinct problems. Values are exact fractions with at most 2 decimals (money in
cents); every division is exact. The rationale has one sentence per operation, each holding its equation
"a op b = c" in digits, and ends with "The answer is X." where X is `answers.format_number(answer)`, as the answer
field.
"""

import random
from fractions import Fraction

from plumbing import answers

NAMES = ["Ava", "Ben", "Chloe", "Diego", "Emma", "Farid", "Grace", "Hiro", "Isla", "Jamal", "Kira", "Liam",
         "Maya", "Noah", "Olga", "Priya", "Quinn", "Ravi", "Sofia", "Tom"]
GOODS = [("notebooks", 120, 480), ("pens", 45, 190), ("apples", 30, 95), ("mugs", 350, 899),
         ("books", 499, 1599), ("candles", 215, 650), ("posters", 150, 725), ("scarves", 899, 1950)]
THINGS = ["marbles", "stickers", "cards", "shells", "beads", "stamps", "coins", "pebbles"]
PLANTS = ["tulips", "tomato plants", "roses", "pepper plants", "sunflowers", "carrots"]
VEHICLES = ["train", "bus", "truck", "ferry", "car"]


def _n(x) -> str:
    return answers.format_number(float(x))


def _eq(a, op: str, b) -> tuple[Fraction, str]:
    """(value, "a op b = value") for exact operands; the value must have at most 2 decimals."""
    a, b = Fraction(a), Fraction(b)
    value = {"+": a + b, "-": a - b, "*": a * b, "/": a / b}[op]
    if (value * 100).denominator != 1 or value < 0:
        raise ValueError(f"{_n(a)} {op} {_n(b)} is not a non-negative amount with at most 2 decimals")
    return value, f"{_n(a)} {op} {_n(b)} = {_n(value)}"


def _money(rng, lo: int, hi: int) -> Fraction:
    return Fraction(rng.randint(lo, hi), 100)


def _shopping(rng, ops):
    name, (goods, lo, hi) = rng.choice(NAMES), rng.choice(GOODS)
    q, price = rng.randint(2, 9), _money(rng, lo, hi)
    cost, e1 = _eq(q, "*", price)
    question = f"{name} buys {q} {goods} that cost {_n(price)} dollars each."
    steps = [f"The {goods} cost {e1} dollars."]
    if ops == 1:
        return question + f" How many dollars does {name} pay?", steps, cost
    if ops == 2:
        bill = next(b for b in (20, 50, 100, 200) if b > cost)
        change, e2 = _eq(bill, "-", cost)
        return (question + f" {name} pays with a {bill} dollar bill. How much change does {name} get in dollars?",
                steps + [f"The change is {e2} dollars."], change)
    goods2, lo2, hi2 = rng.choice([g for g in GOODS if g[0] != goods])
    q2, price2 = rng.randint(2, 9), _money(rng, lo2, hi2)
    cost2, e2 = _eq(q2, "*", price2)
    total, e3 = _eq(cost, "+", cost2)
    question += f" {name} also buys {q2} {goods2} at {_n(price2)} dollars each. How many dollars does {name} spend?"
    return question, steps + [f"The {goods2} cost {e2} dollars.", f"Altogether {name} spends {e3} dollars."], total


def _sharing(rng, ops):
    name, friend, things = *rng.sample(NAMES, 2), rng.choice(THINGS)
    each, k, kept = rng.randint(2, 15), rng.randint(2, 8), rng.randint(1, 20)
    if ops == 1:
        total, e1 = _eq(each * k, "/", k)
        return (f"{name} shares {each * k} {things} equally among {k} friends. How many {things} does each "
                f"friend get?", [f"Each friend gets {e1} {things}."], total)
    rest, e1 = _eq(each * k + kept, "-", kept)
    share, e2 = _eq(rest, "/", k)
    question = f"{name} has {each * k + kept} {things} and keeps {kept} of them."
    if ops == 2:
        return (question + f" The rest are shared equally among {k} friends. How many {things} does each friend "
                f"get?", [f"{name} gives away {e1} {things}.", f"Each friend gets {e2} {things}."], share)
    extra = rng.randint(1, 9)
    final, e3 = _eq(share, "+", extra)
    return (question + f" The rest are shared equally among {k} friends, and {friend}, one of them, then finds "
            f"{extra} more. How many {things} does {friend} have now?",
            [f"{name} gives away {e1} {things}.", f"Each friend gets {e2} {things}.",
             f"{friend} then has {e3} {things}."], final)


def _baking(rng, ops):
    name, friend = rng.sample(NAMES, 2)
    batches, per = rng.randint(2, 6), rng.randint(8, 24)
    cookies, e1 = _eq(batches, "*", per)
    question = f"{name} bakes {batches} batches of {per} cookies."
    if ops == 1:
        return question + " How many cookies is that?", [f"That is {e1} cookies."], cookies
    bag = rng.randint(2, 6)
    bags = rng.randint(1, (int(cookies) - 1) // bag)
    eaten = int(cookies) - bags * bag
    left, e2 = _eq(cookies, "-", eaten)
    steps = [f"{name} bakes {e1} cookies.", f"After {friend} eats some, {e2} cookies are left."]
    question += f" {friend} eats {eaten} of them."
    if ops == 2:
        return question + " How many cookies are left?", steps, left
    n_bags, e3 = _eq(left, "/", bag)
    return (question + f" The rest are packed in bags of {bag}. How many bags are filled?",
            steps + [f"They fill {e3} bags."], n_bags)


def _garden(rng, ops):
    name, plants = rng.choice(NAMES), rng.choice(PLANTS)
    rows, per = rng.randint(3, 12), rng.randint(4, 15)
    total, e1 = _eq(rows, "*", per)
    question = f"{name} plants {rows} rows of {plants} with {per} in each row."
    if ops == 1:
        return question + f" How many {plants} does {name} plant?", [f"{name} plants {e1} {plants}."], total
    dead = rng.randint(1, int(total) - 1)
    alive, e2 = _eq(total, "-", dead)
    steps = [f"{name} plants {e1} {plants}.", f"After {dead} die, {e2} are left."]
    question += f" Then {dead} of them die."
    if ops == 2:
        return question + f" How many {plants} are left?", steps, alive
    more = rng.randint(2, 30)
    final, e3 = _eq(alive, "+", more)
    return (question + f" Next week {name} plants {more} more. How many {plants} are in the garden now?",
            steps + [f"Now there are {e3} {plants}."], final)


def _reading(rng, ops):
    name = rng.choice(NAMES)
    pages, days = rng.randint(8, 40), rng.randint(2, 9)
    read, e1 = _eq(pages, "*", days)
    question = f"{name} reads {pages} pages a day for {days} days."
    if ops == 1:
        return question + f" How many pages does {name} read?", [f"{name} reads {e1} pages."], read
    if ops == 2:
        book = int(read) + rng.randint(5, 200)
        left, e2 = _eq(book, "-", read)
        return (question + f" The book has {book} pages. How many pages are left to read?",
                [f"{name} reads {e1} pages.", f"There are {e2} pages left."], left)
    pages2, days2 = rng.randint(8, 40), rng.randint(2, 9)
    read2, e2 = _eq(pages2, "*", days2)
    total, e3 = _eq(read, "+", read2)
    return (question + f" Then {name} reads {pages2} pages a day for {days2} more days. How many pages does "
            f"{name} read in all?", [f"First {name} reads {e1} pages.", f"Then {name} reads {e2} pages.",
                                     f"In all {name} reads {e3} pages."], total)


def _travel(rng, ops):
    vehicle = rng.choice(VEHICLES)
    speed, hours = rng.randint(3, 18) * 5, Fraction(rng.randint(2, 12), 2)
    dist, e1 = _eq(speed, "*", hours)
    question = f"A {vehicle} travels at {speed} km per hour for {_n(hours)} hours."
    steps = [f"It covers {e1} km."]
    if ops == 1:
        return question + " How many km does it travel?", steps, dist
    if ops == 2:
        route = int(dist) + rng.randint(10, 300)
        left, e2 = _eq(route, "-", dist)
        return (question + f" The whole route is {route} km. How many km are still to go?",
                steps + [f"It still has {e2} km to go."], left)
    speed2, hours2 = rng.randint(3, 18) * 5, Fraction(rng.randint(2, 12), 2)
    dist2, e2 = _eq(speed2, "*", hours2)
    total, e3 = _eq(dist, "+", dist2)
    return (question + f" Then it travels at {speed2} km per hour for {_n(hours2)} hours. How many km does it "
            f"travel in total?", steps + [f"Then it covers {e2} km.", f"In total it travels {e3} km."], total)


def _recipe(rng, ops):
    name = rng.choice(NAMES)
    cups, cakes = Fraction(rng.randint(2, 14), 4), rng.randint(2, 9)
    need, e1 = _eq(cups, "*", cakes)
    question = f"A cake needs {_n(cups)} cups of flour. {name} bakes {cakes} cakes."
    if ops == 1:
        return question + " How many cups of flour are needed?", [f"{name} needs {e1} cups."], need
    has = Fraction(rng.randint(1, int(need * 4) - 1), 4)
    buy, e2 = _eq(need, "-", has)
    steps = [f"{name} needs {e1} cups.", f"{name} must buy {e2} cups."]
    question += f" {name} has {_n(has)} cups at home."
    if ops == 2:
        return question + " How many more cups of flour must be bought?", steps, buy
    price = Fraction(rng.randint(10, 30) * 4, 100)  # whole cents for any number of quarter cups
    cost, e3 = _eq(buy, "*", price)
    return (question + f" Flour costs {_n(price)} dollars a cup. How many dollars does the missing flour cost?",
            steps + [f"That flour costs {e3} dollars."], cost)


def _savings(rng, ops):
    name, gadget = rng.choice(NAMES), rng.choice(["bike", "camera", "guitar", "tablet", "skateboard"])
    weekly, weeks = Fraction(rng.randint(10, 80), 2), rng.randint(3, 20)
    saved, e1 = _eq(weekly, "*", weeks)
    question = f"{name} saves {_n(weekly)} dollars every week for {weeks} weeks."
    if ops == 1:
        return question + f" How many dollars does {name} save?", [f"{name} saves {e1} dollars."], saved
    spent = _money(rng, 100, int(saved * 100) - 1)
    left, e2 = _eq(saved, "-", spent)
    steps = [f"{name} saves {e1} dollars.", f"After buying the {gadget}, {e2} dollars are left."]
    question += f" Then {name} buys a {gadget} for {_n(spent)} dollars."
    if ops == 2:
        return question + " How many dollars are left?", steps, left
    gift = rng.randint(5, 50)
    final, e3 = _eq(left, "+", gift)
    return (question + f" A grandparent then gives {name} {gift} dollars. How many dollars does {name} have now?",
            steps + [f"With the gift {name} has {e3} dollars."], final)


def _tickets(rng, ops):
    show = rng.choice(["museum", "zoo", "concert", "play", "aquarium"])
    adult, child = _money(rng, 800, 2500), _money(rng, 300, 790)
    adults, kids = rng.randint(2, 6), rng.randint(2, 8)
    cost_a, e1 = _eq(adults, "*", adult)
    question = f"Adult tickets to the {show} cost {_n(adult)} dollars and child tickets cost {_n(child)} dollars."
    if ops == 1:
        return (question + f" How many dollars do {adults} adult tickets cost?",
                [f"The adult tickets cost {e1} dollars."], cost_a)
    if ops == 2:
        total, e2 = _eq(cost_a, "+", child)
        return (question + f" A parent buys {adults} adult tickets and one child ticket. How many dollars is that?",
                [f"The adult tickets cost {e1} dollars.", f"With the child ticket it is {e2} dollars."], total)
    cost_k, e2 = _eq(kids, "*", child)
    total, e3 = _eq(cost_a, "+", cost_k)
    return (question + f" A group buys {adults} adult and {kids} child tickets. How many dollars do they pay?",
            [f"The adult tickets cost {e1} dollars.", f"The child tickets cost {e2} dollars.",
             f"Together they pay {e3} dollars."], total)


def _collection(rng, ops):
    name, friend, things = *rng.sample(NAMES, 2), rng.choice(THINGS)
    albums, per, given = rng.randint(2, 9), rng.randint(2, 12), rng.randint(1, 20)
    bought = rng.randint(1, albums * per + given - 1)
    start = albums * per + given - bought  # so that (start + bought - given) / albums is exact
    total, e1 = _eq(start, "+", bought)
    question = f"{name} has {start} {things} and buys {bought} more."
    if ops == 1:
        return question + f" How many {things} does {name} have now?", [f"{name} has {e1} {things}."], total
    left, e2 = _eq(total, "-", given)
    steps = [f"{name} has {e1} {things}.", f"After giving {given} to {friend}, {name} has {e2} {things}."]
    question += f" Then {name} gives {given} to {friend}."
    if ops == 2:
        return question + f" How many {things} does {name} have left?", steps, left
    per, e3 = _eq(left, "/", albums)
    return (question + f" The rest are put equally into {albums} boxes. How many {things} go in each box?",
            steps + [f"Each box gets {e3} {things}."], per)


SCENARIOS = [_shopping, _sharing, _baking, _garden, _reading, _travel, _recipe, _savings, _tickets, _collection]


def make_problems(n: int, seed: int = 0) -> list[dict]:
    """n distinct problems `{id: "builtin-<seed>-<i>", question, answer, rationale}`, the same for a seed."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng, seen, out = random.Random(seed), set(), []
    for _ in range(100 * n + 100):
        if len(out) == n:
            break
        question, steps, answer = rng.choice(SCENARIOS)(rng, rng.randint(1, 3))
        if question in seen:
            continue
        seen.add(question)
        rationale = " ".join(steps) + f" The answer is {answers.format_number(float(answer))}."
        out.append({"id": f"builtin-{seed}-{len(out)}", "question": question,
                    "answer": answers.format_number(float(answer)), "rationale": rationale})
    if len(out) < n:
        raise ValueError(f"could not make {n} distinct problems")
    return out
