"""A realistic, deterministic demo data set: the order administration of a Dutch wholesaler.

The product learns from an administration's corrections log, so a demo needs more than clean rows: it needs
the history as staff left it, the log of what they corrected, and a new batch with known mistakes to score.
`generate` writes all of it in the contract's format (`CONTRACT.md`, section 1):

- ``config.yaml``: the field types of the orders table.
- ``records.csv``: the history, one row per order, sorted by entry time, **as currently stored**: the errors
  staff found are corrected, the ones they missed (about 15%) are still as entered, and records staff merged
  away as duplicates are still present.
- ``corrections.csv``: the staff's audit log (``edit``, ``merge`` and a few ``confirm`` rows).
- ``batch.csv``: new orders entered after the history, **as entered**, with errors and duplicates (of each
  other and of history records).
- ``batch_truth.csv``: the log a perfect clerk would write for the batch: every wrong cell and duplicate.
- ``history_truth.csv``: the same for the history, including what staff missed; it measures how incomplete
  the log's labels are.

How the data is made:

1. A customer table: company and person names, codes, addresses with postcodes, cities and area codes that
   agree, and per customer a typical order size and VAT rate. A few customers place most orders (Zipf).
2. True orders per segment (history, then batch), spread over working hours; about 3.5% of the rows are
   re-registrations of an earlier order, a few minutes to a few days later.
3. Entry errors per cell, each kind with its own small rate (`ERROR_RATES`); duplicates are entered more
   sloppily (`DUPLICATE_SLIP_WEIGHTS`). Together about 10% of records carry at least one error.
4. Staff find each error and each duplicate of the history independently with probability 85%, within
   14 days of entry.

Everything is drawn from `numpy.random.default_rng(seed)`: the same arguments give byte-identical files, and
the history does not depend on the batch size (unless the batch is so large that a year holds a million
orders: then every order number gets a seventh digit). Rows are held as numeric arrays and turned into text in
chunks while writing, so a batch of a million rows fits in a few hundred megabytes.

Example::

    paths = generate(Path("demo"), history=4000, batch=800)
    records = pd.read_csv(paths.records, dtype=str, keep_default_na=False)
"""

from __future__ import annotations

import csv
import datetime as dt
import logging
import math
import time
import unicodedata
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, TypeVar

import numpy as np

from pipeline import schema as s

logger = logging.getLogger(__name__)

T = TypeVar("T")

# --- The data set's shape --------------------------------------------------------------------------------

ID_COLUMN: Final = "record_id"
TIME_COLUMN: Final = "entered_at"
FIELDS: Final = (
    "customer_code",
    "customer_name",
    "street",
    "postcode",
    "city",
    "email",
    "phone",
    "order_number",
    "order_date",
    "amount",
    "vat_rate",
)
NOTES_COLUMN: Final = "notes"  # passed through: not in the config
COLUMNS: Final = (ID_COLUMN, TIME_COLUMN, *FIELDS, NOTES_COLUMN)

CONFIG_YAML: Final = """\
name: orders
id_column: record_id
time_column: entered_at
minutes_per_correction: 4
minutes_per_false_alarm: 1
fields:
  customer_code: {type: code}
  customer_name: {type: text}
  street: {type: text}
  postcode: {type: code}
  city: {type: category}
  email: {type: text}
  phone: {type: code}
  order_number: {type: code}
  order_date: {type: date}
  amount: {type: number}
  vat_rate: {type: category}
"""

CONFIG_FILE: Final = "config.yaml"
HISTORY_FILE: Final = "records.csv"
CORRECTIONS_FILE: Final = "corrections.csv"
BATCH_FILE: Final = "batch.csv"
BATCH_TRUTH_FILE: Final = "batch_truth.csv"
HISTORY_TRUTH_FILE: Final = "history_truth.csv"

MAX_CUSTOMERS: Final = 90_000  # customer codes have five digits, the first not 0
WRITE_CHUNK_ROWS: Final = 100_000

# --- Time ------------------------------------------------------------------------------------------------

HISTORY_START: Final = np.datetime64("2023-01-02", "D")  # a Monday
HISTORY_WORKING_DAYS: Final = 390  # about 18 months
BATCH_WORKING_DAYS: Final = 10  # the two weeks after the history
WORK_START_MINUTE: Final = 8 * 60
WORK_END_MINUTE: Final = 17 * 60 + 30
# Days between the order and its entry: mostly the same or the next day.
ORDER_DATE_LAGS: Final = (0, 1, 2, 3, 4, 5, 6, 7)
ORDER_DATE_LAG_WEIGHTS: Final = (0.45, 0.25, 0.12, 0.07, 0.04, 0.03, 0.02, 0.02)

# --- Customers -------------------------------------------------------------------------------------------

# name, postcode range (first four digits, inclusive), area code, relative number of customers
CITIES: Final = (
    ("Amsterdam", 1011, 1109, "020", 9.0),
    ("Rotterdam", 3011, 3089, "010", 7.0),
    ("Den Haag", 2491, 2599, "070", 6.0),
    ("Utrecht", 3511, 3585, "030", 4.5),
    ("Eindhoven", 5611, 5658, "040", 3.0),
    ("Groningen", 9711, 9747, "050", 3.0),
    ("Tilburg", 5011, 5049, "013", 2.8),
    ("Almere", 1311, 1363, "036", 2.8),
    ("Breda", 4811, 4839, "076", 2.4),
    ("Nijmegen", 6511, 6546, "024", 2.3),
    ("Apeldoorn", 7311, 7339, "055", 2.0),
    ("Haarlem", 2011, 2037, "023", 2.0),
    ("Arnhem", 6811, 6846, "026", 2.0),
    ("Enschede", 7511, 7548, "053", 2.0),
    ("Amersfoort", 3811, 3829, "033", 2.0),
    ("'s-Hertogenbosch", 5211, 5237, "073", 1.7),
    ("Zwolle", 8011, 8043, "038", 1.6),
    ("Zaandam", 1501, 1509, "075", 1.5),
    ("Leiden", 2311, 2334, "071", 1.5),
    ("Maastricht", 6211, 6229, "043", 1.5),
    ("Dordrecht", 3311, 3329, "078", 1.4),
    ("Zoetermeer", 2711, 2729, "079", 1.4),
    ("Leeuwarden", 8911, 8939, "058", 1.2),
    ("Deventer", 7411, 7429, "0570", 1.0),
    ("Delft", 2611, 2629, "015", 1.0),
    ("Alkmaar", 1811, 1827, "072", 1.0),
    ("Venlo", 5911, 5928, "077", 1.0),
    ("Hilversum", 1211, 1223, "035", 1.0),
    ("Amstelveen", 1181, 1189, "020", 1.0),
    ("Helmond", 5701, 5709, "0492", 0.9),
    ("Gouda", 2801, 2809, "0182", 0.8),
    ("Assen", 9401, 9409, "0592", 0.6),
    ("Middelburg", 4331, 4338, "0118", 0.5),
)
POSTCODE_LETTERS: Final = "ABCDEFGHJKLMNPRSTVWXZ"
POSTCODE_UNUSED_LETTERS: Final = frozenset({"SA", "SD", "SS"})

SURNAMES: Final = (
    "Jansen", "de Jong", "de Vries", "van den Berg", "van Dijk", "Bakker", "Janssen", "Visser", "Smit",
    "Meijer", "de Boer", "Mulder", "de Groot", "Bos", "Vos", "Peters", "Hendriks", "van Leeuwen", "Dekker",
    "Brouwer", "de Wit", "Dijkstra", "Smits", "de Graaf", "van der Meer", "van der Linden", "Kok", "Jacobs",
    "de Haan", "Vermeulen", "van den Heuvel", "van der Veen", "van den Broek", "de Bruijn", "van der Heijden",
    "Schouten", "van Beek", "Willems", "van Vliet", "van de Ven", "Hoekstra", "Maas", "Verhoeven", "Koster",
    "van Dam", "van der Wal", "Prins", "Blom", "Huisman", "Peeters", "de Lange", "Kuipers", "van Wijk",
    "Postma", "Veenstra", "Kramer", "van den Brink", "Scholten", "Timmermans", "Groen", "Gerritsen",
    "Öztürk", "Yılmaz", "El Amrani", "Şahin", "Nguyen", "Bouzid",
)  # fmt: skip
SECTORS: Final = (
    "Installatietechniek", "Bouw", "Transport", "Techniek", "Schilderwerken", "Elektro", "Metaalbewerking",
    "Dakwerken", "Logistiek", "Advies", "Horeca", "Groothandel", "Interieurbouw", "Tegelwerken",
    "Loodgietersbedrijf", "Automatisering", "Hoveniers", "Vastgoed", "Keukens", "Machinebouw", "Catering",
    "Kozijnen", "Grondverzet", "Verhuur", "Onderhoud",
)  # fmt: skip
TRADES: Final = (
    "Bakkerij", "Slagerij", "Garage", "Schildersbedrijf", "Hoveniersbedrijf", "Kapsalon", "Autobedrijf",
    "Timmerbedrijf", "Café", "Bloemenhuis", "Drukkerij", "Fietsenmakerij",
)  # fmt: skip
LEGAL_SUFFIXES: Final = ("", " B.V.", " V.O.F.", " Holding B.V.", " & Partners")
LEGAL_SUFFIX_WEIGHTS: Final = (0.32, 0.50, 0.10, 0.03, 0.05)
INITIALS: Final = "ABCDEFGHJKLMPRSTW"

STREETS: Final = (
    "Kerkstraat", "Dorpsstraat", "Molenweg", "Stationsweg", "Schoolstraat", "Julianastraat", "Beatrixlaan",
    "Wilhelminastraat", "Oranjestraat", "Hoofdstraat", "Nieuwstraat", "Parallelweg", "Lindenlaan",
    "Eikenlaan", "Kastanjelaan", "Prinses Irenestraat", "Burgemeester Visserlaan", "Van Goghstraat",
    "Rembrandtlaan", "Vondelstraat", "Marktstraat", "Havenweg", "Spoorstraat", "Tuinstraat", "Kanaalweg",
    "Dijkweg", "Prins Hendrikkade", "Koningin Julianaweg", "Sint Jansstraat",
)  # fmt: skip
BUSINESS_STREETS: Final = (
    "Industrieweg", "Nijverheidsweg", "Ambachtsweg", "Handelsweg", "Edisonstraat", "Marconistraat",
    "Energieweg", "Transportweg", "Smidsweg", "Bedrijvenpark", "Zuiderhavenweg", "Televisieweg",
)  # fmt: skip
COMPANY_EMAIL_BOXES: Final = ("info", "info", "info", "verkoop", "administratie", "inkoop", "orders")
PRIVATE_EMAIL_DOMAINS: Final = ("gmail.com", "hotmail.com", "ziggo.nl", "kpnmail.nl", "outlook.com")
# Letters that NFKD does not reduce to ASCII.
ASCII_LETTERS: Final = str.maketrans({"ı": "i", "ş": "s", "ğ": "g", "ß": "ss", "ø": "o", "æ": "ae"})

PERSON_SHARE: Final = 0.25
BUSINESS_MOBILE_SHARE: Final = 0.2  # companies that gave a mobile number; private customers always do
ZIPF_EXPONENT: Final = 0.8  # customer k (by size) places orders in proportion to 1 / k**ZIPF_EXPONENT
TYPICAL_AMOUNT: Final = 350.0  # euros; each customer's typical order size is lognormal around it
TYPICAL_AMOUNT_SPREAD: Final = 1.0  # sigma of log(typical order size) between customers
ORDER_AMOUNT_SPREAD: Final = 0.45  # sigma of log(amount) within a customer
MINIMUM_AMOUNT_CENTS: Final = 500

VAT_RATES: Final = ("21", "9", "0")
VAT_RATE_WEIGHTS: Final = (0.80, 0.15, 0.05)  # each customer's usual rate
USUAL_VAT_SHARE: Final = 0.93  # the other orders draw from VAT_RATE_WEIGHTS again

# Index 0, the empty note, is by far the most common.
NOTES: Final = (
    "",
    "spoed",
    "levering via achterdeur",
    "bellen voor levering",
    "afleveren tussen 8:00 en 12:00",
    "levering bij buren, nr. 14",
    'klant vraagt "zo snel mogelijk"',
    "factuur per e-mail, t.a.v. administratie",
    "afhalen",
    "let op: nieuw afleveradres",
    "deels geleverd, rest volgt",
    "ref. klant: PO 88213",
    'pallet, "laadklep" nodig',
)
NOTE_SHARE: Final = 0.08
DUPLICATE_NOTES: Final = ("telefonisch doorgegeven", "per mail ontvangen", "opnieuw ingevoerd", "dubbel?")
DUPLICATE_NOTE_SHARE: Final = 0.4

# --- Duplicates, errors, staff ---------------------------------------------------------------------------

PREVIOUS_YEAR_SHARE: Final = 0.65  # orders numbered in the year before the history, per history record
REPEAT_MIN_DAYS: Final = 20  # a repeat order copies an order at least this many days older
DUPLICATE_RATE: Final = 0.035  # share of each segment's rows that re-register an earlier order
DUPLICATE_SAME_DAY_SHARE: Final = 0.55  # the rest follow one to four working days later
DUPLICATE_SAME_NUMBER_SHARE: Final = 0.4  # the rest got a new order number when registered again
BATCH_DUPLICATE_OF_HISTORY_SHARE: Final = 0.35  # batch duplicates re-registering a history order
RECENT_HISTORY_DAYS: Final = 14  # ... entered this many days before the batch starts
# Each kind of entry error strikes a record with this probability; about 10% of records get at least one.
ERROR_RATES: Final = {
    "missing customer code": 0.025,
    "order number slip": 0.010,
    "name typo": 0.010,
    "street typo": 0.007,
    "email typo": 0.007,
    "city disagrees with postcode": 0.006,
    "postcode slip": 0.005,
    "decimal point slip": 0.006,
    "date slip": 0.007,
    "wrong VAT rate": 0.004,
}
DECIMAL_SLIP_SHIFTS: Final = (1, 2, -1)  # the decimal point moved this many places to the right
DECIMAL_SLIP_WEIGHTS: Final = (0.45, 0.35, 0.2)
DUPLICATE_SLIP_RATE: Final = 0.5  # duplicates get one extra error this often, on top of ERROR_RATES
# Which extra error; an order number slip only where the duplicate was meant to carry the original's number.
DUPLICATE_SLIP_WEIGHTS: Final = {"missing customer code": 0.4, "name typo": 0.4, "order number slip": 0.2}

STAFF_FIND_RATE: Final = 0.85  # per error and per duplicate, independently
STAFF_MEAN_DELAY_MINUTES: Final = 1.5 * 24 * 60
# Corrections outside working hours move to the next working morning, at most three days later, so every
# correction falls within 14 days of the entry.
STAFF_MAX_DELAY_MINUTES: Final = 11 * 24 * 60
CONFIRM_RATE: Final = 0.01  # of the history's clean records

# QWERTY rows, for typing the key next to the intended one.
KEYBOARD_ROWS: Final = ("qwertyuiop", "asdfghjkl", "zxcvbnm")


# --- Public API ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DemoPaths:
    """Where `generate` wrote the demo data set."""

    config: Path
    records: Path
    corrections: Path
    batch: Path
    batch_truth: Path
    history_truth: Path


def generate(
    out_dir: Path,
    *,
    customers: int = 300,
    history: int = 4000,
    batch: int = 800,
    seed: int = 7,
    repeat_share: float = 0.0,
) -> DemoPaths:
    """Writes a demo order administration into `out_dir` (created if needed) and returns the file paths.

    `customers` is the size of the customer table, `history` the number of history records (merged-away
    duplicates included), `batch` the number of new records to score (0 gives an empty batch).
    `repeat_share` is the share of new orders that repeat the amount (and VAT rate) of an order the same
    customer placed at least `REPEAT_MIN_DAYS` earlier: standing orders, which a busy customer's history is
    full of and which are not re-registrations (0, the default, leaves the data as without it). The same
    arguments always give byte-identical files; the history does not depend on `batch` (but see the module
    docstring for huge batches).

    Raises ValueError when a size or the seed is out of range.
    """
    _check_arguments(customers=customers, history=history, batch=batch, seed=seed)
    if not 0.0 <= repeat_share <= 1.0:
        raise ValueError(f"repeat_share must be between 0 and 1, got {repeat_share!r}")
    customers, history, batch = int(customers), int(history), int(batch)
    started = time.perf_counter()
    # A fifth stream for repeat orders leaves the other four (and so the data without repeats) unchanged.
    customer_rng, history_rng, staff_rng, batch_rng, repeat_rng = np.random.default_rng(seed).spawn(5)
    repeats = (repeat_rng, float(repeat_share))

    table = _make_customers(customers, customer_rng)
    # The business ran before the history starts: the first year's numbering is well under way.
    year_before = int(_years(HISTORY_START)) - 1
    next_number = {year_before: round(history * PREVIOUS_YEAR_SHARE) + 1}
    history_orders = _make_segment(
        history_rng,
        history,
        table,
        HISTORY_START,
        HISTORY_WORKING_DAYS,
        _Orders.empty(),
        next_number,
        repeats,
    )
    batch_start = np.busday_offset(history_orders.entered[-1].astype("datetime64[D]"), 1, roll="forward")
    batch_orders = _make_segment(
        batch_rng, batch, table, batch_start, BATCH_WORKING_DAYS, history_orders, next_number, repeats
    )
    view = _View(_Orders.concat(history_orders, batch_orders), table)
    history_rows, batch_rows = range(0, history), range(history, history + batch)
    history_cells = _inject_errors(history_rng, view, history_rows)
    batch_cells = _inject_errors(batch_rng, view, batch_rows)
    staff = _simulate_staff(staff_rng, view.orders, history_cells, history)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = DemoPaths(
        config=out_dir / CONFIG_FILE,
        records=out_dir / HISTORY_FILE,
        corrections=out_dir / CORRECTIONS_FILE,
        batch=out_dir / BATCH_FILE,
        batch_truth=out_dir / BATCH_TRUTH_FILE,
        history_truth=out_dir / HISTORY_TRUTH_FILE,
    )
    paths.config.write_text(CONFIG_YAML, encoding="utf-8")
    _write_records(paths.records, view, history_rows, history_cells.missed(staff.found_cells))
    _write_records(paths.batch, view, batch_rows, batch_cells)
    _write_log(paths.corrections, _staff_log(view, history_cells, staff))
    _write_log(paths.batch_truth, _truth_log(view, batch_cells, batch_rows))
    _write_log(paths.history_truth, _truth_log(view, history_cells, history_rows))

    logger.info(
        "Generated %d customers, %d history records (%d with errors, %d duplicates; staff logged %d edits "
        "and %d merges) and %d batch records (%d with errors, %d duplicates) in %s in %.1f s",
        customers,
        history,
        history_cells.records_with_errors(),
        int((history_orders.original >= 0).sum()),
        int(staff.found_cells.sum()),
        int(staff.found_duplicates.sum()),
        batch,
        batch_cells.records_with_errors(),
        int((batch_orders.original >= 0).sum()),
        out_dir,
        time.perf_counter() - started,
    )
    return paths


def _check_arguments(*, customers: int, history: int, batch: int, seed: int) -> None:
    """Rejects sizes and seeds `generate` cannot work with, saying which argument and why."""
    for name, value, minimum in (("customers", customers, 1), ("history", history, 1), ("batch", batch, 0)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            raise ValueError(f"{name} must be an integer, got {value!r}")
        if value < minimum:
            raise ValueError(f"{name} must be at least {minimum}, got {value}")
    if customers > MAX_CUSTOMERS:
        raise ValueError(
            f"customers must be at most {MAX_CUSTOMERS} (customer codes have 5 digits), got {customers}"
        )
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")


# --- Customers -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Customers:
    """The customer table: fixed details per customer (text arrays) and ordering habits."""

    code: np.ndarray
    name: np.ndarray
    street: np.ndarray
    postcode: np.ndarray
    city: np.ndarray
    email: np.ndarray
    phone: np.ndarray
    order_weight: np.ndarray  # probability that an order is theirs
    log_amount: np.ndarray  # log of the typical order size in euros
    vat: np.ndarray  # index into VAT_RATES of the usual rate

    def __len__(self) -> int:
        return len(self.code)


def _make_customers(n: int, rng: np.random.Generator) -> _Customers:
    """Draws `n` customers with consistent details; a few of them will place most of the orders."""
    codes = 10_000 + rng.choice(MAX_CUSTOMERS, size=n, replace=False)
    city_weights = np.array([city[4] for city in CITIES])
    cities = rng.choice(len(CITIES), size=n, p=city_weights / city_weights.sum())
    is_person = rng.random(n) < PERSON_SHARE

    details: dict[str, list[str]] = {
        name: [] for name in ("name", "street", "postcode", "city", "email", "phone")
    }
    taken: set[str] = set()
    for person, city in zip(is_person.tolist(), cities.tolist(), strict=True):
        name = _unique_name(rng, person, CITIES[city][0], taken)
        mobile = person or rng.random() < BUSINESS_MOBILE_SHARE
        details["name"].append(name)
        details["street"].append(_street(rng, business=not person))
        details["postcode"].append(_postcode(rng, city))
        details["city"].append(CITIES[city][0])
        details["email"].append(_email(rng, name, person))
        details["phone"].append(_phone(rng, city, mobile=mobile))
    ranks = rng.permutation(n) + 1
    weights = 1.0 / ranks**ZIPF_EXPONENT
    return _Customers(
        code=np.array([f"C-{code}" for code in codes.tolist()], dtype=object),
        **{name: np.array(values, dtype=object) for name, values in details.items()},
        order_weight=weights / weights.sum(),
        log_amount=rng.normal(math.log(TYPICAL_AMOUNT), TYPICAL_AMOUNT_SPREAD, n),
        vat=rng.choice(len(VAT_RATES), size=n, p=VAT_RATE_WEIGHTS),
    )


def _pick(rng: np.random.Generator, options: Sequence[T], weights: Sequence[float] | None = None) -> T:
    """One of `options`, uniformly or by `weights`."""
    if weights is None:
        return options[int(rng.integers(len(options)))]
    return options[int(rng.choice(len(options), p=weights))]


def _leading(surname: str) -> str:
    """A surname as it is written without initials before it: "van Dijk" becomes "Van Dijk"."""
    return surname[0].upper() + surname[1:]


def _company_name(rng: np.random.Generator) -> str:
    """A company name such as "Bakker Installatietechniek B.V.", "Jansen & Zn" or "Garage Van Dijk"."""
    surname = _leading(_pick(rng, SURNAMES))
    style = rng.random()
    if style < 0.55:
        return f"{surname} {_pick(rng, SECTORS)}{_pick(rng, LEGAL_SUFFIXES, LEGAL_SUFFIX_WEIGHTS)}"
    if style < 0.68:
        return f"{surname} & {_pick(rng, ('Zn', 'Zonen', 'Zn.'))}"
    if style < 0.80:
        return (
            f"{surname} & {_leading(_pick(rng, SURNAMES))}{_pick(rng, LEGAL_SUFFIXES, LEGAL_SUFFIX_WEIGHTS)}"
        )
    return f"{_pick(rng, TRADES)} {surname}"


def _person_name(rng: np.random.Generator) -> str:
    """A private customer: "Fam. Visser", "J. de Vries" or "A.M. van den Berg"."""
    surname = _pick(rng, SURNAMES)
    if rng.random() < 0.35:
        return f"Fam. {_leading(surname)}"
    initials = "".join(f"{_pick(rng, INITIALS)}." for _ in range(1 + int(rng.random() < 0.3)))
    return f"{initials} {surname}"


def _unique_name(rng: np.random.Generator, person: bool, city: str, taken: set[str]) -> str:
    """A customer name not yet in `taken` (which it joins); after a few tries the city makes it unique."""
    for _ in range(20):
        name = _person_name(rng) if person else _company_name(rng)
        if name not in taken:
            break
    else:
        name = f"{name} {city}"
        while name in taken:
            name = f"{name} {_pick(rng, INITIALS)}"
    taken.add(name)
    return name


def _street(rng: np.random.Generator, *, business: bool) -> str:
    """A street and house number such as "Kerkstraat 12" or "Industrieweg 4a"."""
    streets = BUSINESS_STREETS if business and rng.random() < 0.6 else STREETS
    number = int(rng.integers(1, 40)) if rng.random() < 0.8 else int(rng.integers(40, 250))
    suffix = _pick(rng, ("a", "b", "c")) if rng.random() < 0.08 else ""
    return f"{_pick(rng, streets)} {number}{suffix}"


def _postcode(rng: np.random.Generator, city: int) -> str:
    """A postcode "1234 AB" within the city's range."""
    _, low, high, _, _ = CITIES[city]
    digits = int(rng.integers(low, high + 1))
    while True:
        letters = _pick(rng, POSTCODE_LETTERS) + _pick(rng, POSTCODE_LETTERS)
        if letters not in POSTCODE_UNUSED_LETTERS:
            return f"{digits} {letters}"


def _phone(rng: np.random.Generator, city: int, *, mobile: bool) -> str:
    """A Dutch phone number: "06-12345678", or the city's area code and a local number ("020-1234567")."""
    if mobile:
        return f"06-{int(rng.integers(10_000_000, 100_000_000))}"
    area_code = CITIES[city][3]
    local_digits = 10 - len(area_code)
    return f"{area_code}-{int(rng.integers(2 * 10 ** (local_digits - 1), 10**local_digits))}"


def _slug(text: str) -> str:
    """Lower-case ASCII letters and digits of `text`: "Öztürk & Zn" becomes "ozturkenzn"."""
    ascii_text = unicodedata.normalize("NFKD", text.lower().translate(ASCII_LETTERS))
    return "".join(ch for ch in ascii_text.replace("&", "en") if ch.isascii() and ch.isalnum())


def _email(rng: np.random.Generator, name: str, person: bool) -> str:
    """An address that follows from the name: info@bakkerinstallatietechniek.nl, j.devries@ziggo.nl."""
    if person:
        local = name.replace("Fam. ", "fam.").replace(". ", ".").lower()
        local = ".".join(_slug(part) for part in local.split(".") if part)
        return f"{local}@{_pick(rng, PRIVATE_EMAIL_DOMAINS)}"
    for suffix in sorted(LEGAL_SUFFIXES[1:], key=len, reverse=True):
        if name.endswith(suffix):
            name = name.removesuffix(suffix)
            break
    return f"{_pick(rng, COMPANY_EMAIL_BOXES)}@{_slug(name)}.nl"


# --- Orders ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Orders:
    """The true orders, one element per record; row i of the data set is element i of every array."""

    entered: np.ndarray  # datetime64[m]
    customer: np.ndarray  # index into the customer table
    order_date: np.ndarray  # datetime64[D]
    order_number: np.ndarray  # running number within the order date's year
    cents: np.ndarray  # the amount in cents
    vat: np.ndarray  # index into VAT_RATES
    note: np.ndarray  # index into NOTES + DUPLICATE_NOTES
    original: np.ndarray  # row of the order this record re-registers, -1 for an original
    same_number: np.ndarray  # a duplicate that was given the original's order number

    def __len__(self) -> int:
        return len(self.entered)

    @staticmethod
    def empty() -> _Orders:
        """No orders: what precedes the history."""
        return _Orders(**{name: _EMPTY_COLUMNS[name] for name in _ORDER_COLUMNS})

    @staticmethod
    def concat(first: _Orders, second: _Orders) -> _Orders:
        """`second`'s rows after `first`'s."""
        return _Orders(
            **{name: np.concatenate([getattr(first, name), getattr(second, name)]) for name in _ORDER_COLUMNS}
        )

    def take(self, rows: np.ndarray) -> _Orders:
        """The orders at `rows`, in that order."""
        return _Orders(**{name: getattr(self, name)[rows] for name in _ORDER_COLUMNS})


_ORDER_COLUMNS: Final = tuple(_Orders.__dataclass_fields__)
_EMPTY_COLUMNS: Final = {
    "entered": np.array([], dtype="datetime64[m]"),
    "customer": np.array([], dtype=np.int64),
    "order_date": np.array([], dtype="datetime64[D]"),
    "order_number": np.array([], dtype=np.int64),
    "cents": np.array([], dtype=np.int64),
    "vat": np.array([], dtype=np.int64),
    "note": np.array([], dtype=np.int64),
    "original": np.array([], dtype=np.int64),
    "same_number": np.array([], dtype=bool),
}


def _make_segment(
    rng: np.random.Generator,
    n: int,
    customers: _Customers,
    first_day: np.datetime64,
    working_days: int,
    earlier: _Orders,
    next_number: dict[int, int],
    repeats: tuple[np.random.Generator, float] | None = None,
) -> _Orders:
    """`n` records entered from `first_day` on, sorted by entry time: new orders and re-registrations.

    Duplicates re-register a new order of this segment or, when `earlier` is not empty, a recent one of
    `earlier` (whose rows come first in the data set). `next_number` holds the next free order number per
    year and is advanced. `repeats` (a generator and a share) turns that share of the new orders into
    repeat orders (see `_repeat_amounts`).
    """
    if n == 0:
        return _Orders.empty()
    n_duplicates = round(n * DUPLICATE_RATE)
    new = _new_orders(rng, n - n_duplicates, customers, first_day, working_days)
    if repeats is not None and repeats[1] > 0:
        _repeat_amounts(repeats[0], new, earlier, repeats[1])
    duplicates = _re_registrations(rng, n_duplicates, new, earlier, first_day, working_days)
    merged = _Orders.concat(new, duplicates)
    order = np.argsort(merged.entered, kind="stable")
    orders = merged.take(order)

    # Originals were numbered as rows of `new` (offset by `earlier`); renumber them to their sorted row.
    sorted_row = np.empty(len(order), dtype=np.int64)
    sorted_row[order] = np.arange(len(order)) + len(earlier)
    in_segment = orders.original >= len(earlier)
    orders.original[in_segment] = sorted_row[orders.original[in_segment] - len(earlier)]

    _number_orders(orders, earlier, next_number)
    return orders


def _new_orders(
    rng: np.random.Generator, n: int, customers: _Customers, first_day: np.datetime64, working_days: int
) -> _Orders:
    """`n` original orders, sorted by entry time; their order numbers are filled in later."""
    days = np.busday_offset(first_day, rng.integers(0, working_days, n), roll="forward")
    minutes = rng.integers(WORK_START_MINUTE, WORK_END_MINUTE, n)
    entered = np.sort(days.astype("datetime64[m]") + minutes.astype("timedelta64[m]"))
    customer = rng.choice(len(customers), size=n, p=customers.order_weight)
    lag = rng.choice(ORDER_DATE_LAGS, size=n, p=ORDER_DATE_LAG_WEIGHTS)
    amount = np.exp(customers.log_amount[customer] + rng.normal(0.0, ORDER_AMOUNT_SPREAD, n))
    usual_vat = rng.random(n) < USUAL_VAT_SHARE
    other_vat = rng.choice(len(VAT_RATES), size=n, p=VAT_RATE_WEIGHTS)
    with_note = rng.random(n) < NOTE_SHARE
    note = np.where(with_note, rng.integers(1, len(NOTES), n), 0)
    return _Orders(
        entered=entered,
        customer=customer,
        order_date=entered.astype("datetime64[D]") - lag.astype("timedelta64[D]"),
        order_number=np.zeros(n, dtype=np.int64),
        cents=np.maximum(np.round(amount * 100).astype(np.int64), MINIMUM_AMOUNT_CENTS),
        vat=np.where(usual_vat, customers.vat[customer], other_vat),
        note=note,
        original=np.full(n, -1, dtype=np.int64),
        same_number=np.zeros(n, dtype=bool),
    )


def _repeat_amounts(rng: np.random.Generator, new: _Orders, earlier: _Orders, share: float) -> None:
    """Gives `share` of the `new` orders the amount and VAT rate of a random earlier order of the same
    customer entered at least `REPEAT_MIN_DAYS` before (when there is one, and the customer has not ordered
    that amount within `REPEAT_MIN_DAYS`): a standing order. In place.

    Orders are handled in entry order, so an order repeated from a repeat carries the amount it was given.
    """
    n, offset = len(new), len(earlier)
    repeat = rng.random(n) < share
    pick = rng.random(n)
    entered = np.concatenate([earlier.entered, new.entered]).astype(np.int64)
    customer = np.concatenate([earlier.customer, new.customer]).astype(np.int64)
    cents = np.concatenate([earlier.cents, new.cents])
    vat = np.concatenate([earlier.vat, new.vat])
    span = int(entered.max()) + 1 if len(entered) else 1
    keys = customer * span + entered
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    group_start = np.searchsorted(sorted_keys, customer * span, side="left")
    cutoff = entered - REPEAT_MIN_DAYS * 24 * 60
    available = np.searchsorted(sorted_keys, customer * span + cutoff, side="right") - group_start
    # A standing order recurs: a customer orders one amount at most once per REPEAT_MIN_DAYS.
    gap = REPEAT_MIN_DAYS * 24 * 60
    last_used: dict[tuple[int, int], int] = {}
    for row in range(offset):
        last_used[(int(customer[row]), int(cents[row]))] = int(entered[row])
    for row in range(n):
        at = offset + row
        count = int(available[at])
        if repeat[row] and count > 0:
            source = int(order[group_start[at] + int(pick[row] * count)])
            if int(entered[at]) - last_used.get((int(customer[at]), int(cents[source])), -gap) >= gap:
                cents[at] = cents[source]
                vat[at] = vat[source]
        last_used[(int(customer[at]), int(cents[at]))] = int(entered[at])
    new.cents[:] = cents[offset:]
    new.vat[:] = vat[offset:]


def _re_registrations(
    rng: np.random.Generator,
    n: int,
    new: _Orders,
    earlier: _Orders,
    first_day: np.datetime64,
    working_days: int,
) -> _Orders:
    """`n` second registrations of orders in `new` or recently in `earlier`, entered after them.

    `original` holds rows of `earlier`, or `len(earlier)` + a row of `new`.
    """
    originals = np.flatnonzero(earlier.original < 0)
    recent = originals[earlier.entered[originals] >= first_day - np.timedelta64(RECENT_HISTORY_DAYS, "D")]
    if len(recent) == 0:
        recent = originals[-50:]  # a quiet fortnight: the last orders before it
    if len(recent):
        of_earlier = rng.random(n) < BATCH_DUPLICATE_OF_HISTORY_SHARE
        earlier_row = rng.choice(recent, size=n)
    else:
        of_earlier = np.zeros(n, dtype=bool)
        earlier_row = np.zeros(n, dtype=np.int64)
    new_row = rng.integers(0, len(new), n)
    source = _Orders.concat(earlier, new)
    original = np.where(of_earlier, earlier_row, len(earlier) + new_row)
    copy = source.take(original)

    start_days = np.busday_offset(first_day, rng.integers(0, min(3, working_days), n), roll="forward")
    start_minutes = rng.integers(WORK_START_MINUTE, WORK_END_MINUTE, n).astype("timedelta64[m]")
    entered = np.where(
        of_earlier, start_days.astype("datetime64[m]") + start_minutes, _later_entry(rng, copy.entered)
    )
    changed_note = rng.random(n) < DUPLICATE_NOTE_SHARE
    note = np.where(changed_note, rng.integers(1, len(NOTES) + len(DUPLICATE_NOTES), n), copy.note)
    return _Orders(
        entered=entered,
        customer=copy.customer,
        order_date=copy.order_date,
        order_number=np.zeros(n, dtype=np.int64),
        cents=copy.cents,
        vat=copy.vat,
        note=note,
        original=original,
        same_number=rng.random(n) < DUPLICATE_SAME_NUMBER_SHARE,
    )


def _later_entry(rng: np.random.Generator, entered: np.ndarray) -> np.ndarray:
    """Entry times a few minutes to a few working days after `entered`, within working hours."""
    n = len(entered)
    day = entered.astype("datetime64[D]")
    minute = (entered - day.astype("datetime64[m]")).astype(np.int64)

    same_day_minute = minute + rng.integers(2, 120, n)
    overflow = same_day_minute >= WORK_END_MINUTE
    same_day = np.where(overflow, np.busday_offset(day, 1, roll="forward"), day)
    same_day_minute = np.where(
        overflow, WORK_START_MINUTE + same_day_minute - WORK_END_MINUTE, same_day_minute
    )

    later_day = np.busday_offset(day, rng.integers(1, 5, n), roll="forward")
    later_minute = rng.integers(WORK_START_MINUTE, WORK_END_MINUTE, n)

    soon = rng.random(n) < DUPLICATE_SAME_DAY_SHARE
    new_day = np.where(soon, same_day, later_day)
    new_minute = np.where(soon, same_day_minute, later_minute)
    return new_day.astype("datetime64[m]") + new_minute.astype("timedelta64[m]")


def _years(dates: np.ndarray | np.datetime64) -> np.ndarray:
    """The calendar years of datetime64 values, as integers."""
    return np.asarray(dates).astype("datetime64[Y]").astype(np.int64) + 1970


def _number_orders(orders: _Orders, earlier: _Orders, next_number: dict[int, int]) -> None:
    """Fills in order numbers in entry order, per year of the order date; duplicates may share one."""
    needs_number = (orders.original < 0) | ~orders.same_number
    years = _years(orders.order_date)
    for year in np.unique(years[needs_number]).tolist():
        rows = np.flatnonzero(needs_number & (years == year))
        start = next_number.get(year, 1)
        orders.order_number[rows] = start + np.arange(len(rows))
        next_number[year] = start + len(rows)
    # `original` counts rows of `earlier` first, then of this segment.
    numbers = np.concatenate([earlier.order_number, orders.order_number])
    sharing = np.flatnonzero(~needs_number)
    orders.order_number[sharing] = numbers[orders.original[sharing]]


# --- Formatting ------------------------------------------------------------------------------------------


class _View:
    """Turns rows of orders into the text the CSV files hold (the true values).

    Record ids and order numbers are zero-padded to one width for the whole data set: 7 and 6 digits, or
    more when there are that many.
    """

    def __init__(self, orders: _Orders, customers: _Customers) -> None:
        self.orders = orders
        self.customers = customers
        largest_number = int(orders.order_number.max()) if len(orders) else 0
        self.id_width = max(7, len(str(len(orders))))
        self.number_width = max(6, len(str(largest_number)))

    def record_ids(self, rows: np.ndarray) -> list[str]:
        """Ids like R0000001, in entry order across the history and the batch."""
        return [f"R{row + 1:0{self.id_width}d}" for row in rows.tolist()]

    def column(self, name: str, rows: np.ndarray) -> list[str]:
        """The true text of column `name` at `rows`."""
        orders, customers = self.orders, self.customers
        if name == ID_COLUMN:
            return self.record_ids(rows)
        if name == TIME_COLUMN:
            return _iso_seconds(orders.entered[rows])
        if name in _CUSTOMER_COLUMNS:
            return getattr(customers, _CUSTOMER_COLUMNS[name])[orders.customer[rows]].tolist()
        if name == "order_number":
            years = _years(orders.order_date[rows]).tolist()
            numbers = orders.order_number[rows].tolist()
            return [f"SO-{y}-{n:0{self.number_width}d}" for y, n in zip(years, numbers, strict=True)]
        if name == "order_date":
            return np.datetime_as_string(orders.order_date[rows], unit="D").tolist()
        if name == "amount":
            return [f"{c // 100}.{c % 100:02d}" for c in orders.cents[rows].tolist()]
        if name == "vat_rate":
            return [VAT_RATES[v] for v in orders.vat[rows].tolist()]
        if name == NOTES_COLUMN:
            return [_ALL_NOTES[v] for v in orders.note[rows].tolist()]
        raise KeyError(name)


_CUSTOMER_COLUMNS: Final = {
    "customer_code": "code",
    "customer_name": "name",
    "street": "street",
    "postcode": "postcode",
    "city": "city",
    "email": "email",
    "phone": "phone",
}
_ALL_NOTES: Final = NOTES + DUPLICATE_NOTES


def _iso_seconds(times: np.ndarray) -> list[str]:
    """ISO 8601 text of datetime64 values, to the second: "2024-03-05T09:41:00"."""
    return np.datetime_as_string(times, unit="s").tolist()


# --- Entry errors ----------------------------------------------------------------------------------------


def _neighbour_keys() -> dict[str, str]:
    """For each letter, the keys around it on a QWERTY keyboard."""
    neighbours: dict[str, str] = {}
    for r, row in enumerate(KEYBOARD_ROWS):
        for c, key in enumerate(row):
            near = [row[i] for i in (c - 1, c + 1) if 0 <= i < len(row)]
            for other in (r - 1, r + 1):
                if 0 <= other < len(KEYBOARD_ROWS):
                    near += [
                        KEYBOARD_ROWS[other][i]
                        for i in (c - 1, c, c + 1)
                        if 0 <= i < len(KEYBOARD_ROWS[other])
                    ]
            neighbours[key] = "".join(near)
    return neighbours


NEIGHBOUR_KEYS: Final = _neighbour_keys()


def _typo(value: str, rng: np.random.Generator) -> str:
    """One slip of the finger on a letter: dropped, doubled, swapped with the next, or a neighbouring key."""
    letters = [i for i, ch in enumerate(value) if ch.isalpha()]
    letters = [i for i in letters if i > 0] or letters  # the first letter is rarely mistyped
    if not letters:
        return value + value[-1:]
    for _ in range(10):
        i = letters[int(rng.integers(len(letters)))]
        slip = int(rng.integers(4))
        if slip == 0:
            typed = value[:i] + value[i + 1 :]
        elif slip == 1:
            typed = value[:i] + value[i] + value[i:]
        elif slip == 2 and i + 1 < len(value):
            typed = value[:i] + value[i + 1] + value[i] + value[i + 2 :]
        else:
            near = NEIGHBOUR_KEYS.get(value[i].lower(), "")
            key = near[int(rng.integers(len(near)))] if near else value[i]
            typed = value[:i] + (key.upper() if value[i].isupper() else key) + value[i + 1 :]
        if typed != value:
            return typed
    return value[:i] + value[i] + value[i:]


def _digit_slip(value: str, rng: np.random.Generator, positions: Sequence[int]) -> str:
    """Two adjacent digits among `positions` swapped, or one of them replaced by another digit."""
    swappable = [
        i for i in positions if i + 1 in positions and value[i] != value[i + 1] and value[i + 1].isdigit()
    ]
    if swappable and rng.random() < 0.5:
        i = swappable[int(rng.integers(len(swappable)))]
        return value[:i] + value[i + 1] + value[i] + value[i + 2 :]
    i = positions[int(rng.integers(len(positions)))]
    digit = str((int(value[i]) + int(rng.integers(1, 10))) % 10)
    return value[:i] + digit + value[i + 1 :]


def _blank(value: str, rng: np.random.Generator) -> str:
    """The value left out."""
    return ""


def _order_number_slip(value: str, rng: np.random.Generator) -> str:
    """A digit slip in an order number, mostly in the running number, sometimes in the year."""
    prefix, year, number = value.split("-")
    start = len(prefix) + 1
    if rng.random() < 0.1:
        positions = list(range(start, start + len(year)))
    else:
        # Slips in the leading zeros are rare: nobody types them, the system pads them.
        first = start + len(year) + 1
        significant = len(number.lstrip("0")) or 1
        positions = list(range(first + len(number) - significant - 1, first + len(number)))
        positions = [p for p in positions if p >= first]
    return _digit_slip(value, rng, positions)


def _postcode_slip(value: str, rng: np.random.Generator) -> str:
    """A digit slip in the four digits of a postcode."""
    return _digit_slip(value, rng, range(4))


def _other_city(value: str, rng: np.random.Generator) -> str:
    """Another city than the postcode's."""
    while True:
        city = CITIES[int(rng.integers(len(CITIES)))][0]
        if city != value:
            return city


def _decimal_slip(value: str, rng: np.random.Generator) -> str:
    """The decimal point typed in the wrong place: 125.00 becomes 1250.00, 12500.00 or 12.50."""
    cents = int(value.replace(".", ""))
    shift = _pick(rng, DECIMAL_SLIP_SHIFTS, DECIMAL_SLIP_WEIGHTS)
    slipped = cents * 10**shift if shift > 0 else round(cents / 10**-shift)
    return f"{slipped // 100}.{slipped % 100:02d}"


def _date_slip(value: str, rng: np.random.Generator) -> str:
    """Day and month swapped (when that is a date), a few days off, or the year off by one."""
    date = dt.date.fromisoformat(value)
    if date.day <= 12 and date.day != date.month and rng.random() < 0.5:
        return date.replace(month=date.day, day=date.month).isoformat()
    if rng.random() < 0.3 and not (date.month == 2 and date.day == 29):
        return date.replace(year=date.year + _pick(rng, (-1, 1))).isoformat()
    days = int(rng.integers(1, 5)) * _pick(rng, (-1, 1))
    return (date + dt.timedelta(days=days)).isoformat()


def _other_vat_rate(value: str, rng: np.random.Generator) -> str:
    """Another VAT rate."""
    others = [rate for rate in VAT_RATES if rate != value]
    return others[int(rng.integers(len(others)))]


@dataclass(frozen=True)
class _ErrorKind:
    """One kind of entry error: the field it hits and how it changes the true value into the typed one."""

    name: str
    field: str
    slip: Callable[[str, np.random.Generator], str]


ERROR_KINDS: Final = {
    kind.name: kind
    for kind in (
        _ErrorKind("missing customer code", "customer_code", _blank),
        _ErrorKind("order number slip", "order_number", _order_number_slip),
        _ErrorKind("name typo", "customer_name", _typo),
        _ErrorKind("street typo", "street", _typo),
        _ErrorKind("email typo", "email", _typo),
        _ErrorKind("city disagrees with postcode", "city", _other_city),
        _ErrorKind("postcode slip", "postcode", _postcode_slip),
        _ErrorKind("decimal point slip", "amount", _decimal_slip),
        _ErrorKind("date slip", "order_date", _date_slip),
        _ErrorKind("wrong VAT rate", "vat_rate", _other_vat_rate),
    )
}


@dataclass
class _Cells:
    """Wrong cells as entered: per field, the rows (global, ascending) and the values typed there."""

    rows: dict[str, np.ndarray]
    values: dict[str, list[str]]

    def __iter__(self) -> Iterator[tuple[str, np.ndarray, list[str]]]:
        """(field, rows, typed values) per field, in `FIELDS` order: the order `found` flags follow."""
        for name in FIELDS:
            if name in self.rows:
                yield name, self.rows[name], self.values[name]

    def count(self) -> int:
        """The number of wrong cells."""
        return sum(len(rows) for rows in self.rows.values())

    def records_with_errors(self) -> int:
        """The number of records with at least one wrong cell."""
        rows = [rows for rows in self.rows.values() if len(rows)]
        return len(np.unique(np.concatenate(rows))) if rows else 0

    def missed(self, found: np.ndarray) -> _Cells:
        """The cells whose flag in `found` (one per cell, in iteration order) is false."""
        rows: dict[str, np.ndarray] = {}
        values: dict[str, list[str]] = {}
        offset = 0
        for name, cell_rows, cell_values in self:
            keep = ~found[offset : offset + len(cell_rows)]
            rows[name] = cell_rows[keep]
            values[name] = [value for value, k in zip(cell_values, keep.tolist(), strict=True) if k]
            offset += len(cell_rows)
        return _Cells(rows, values)


def _inject_errors(rng: np.random.Generator, view: _View, rows: range) -> _Cells:
    """Entry errors in `rows`, at most one per cell.

    Duplicates first get their extra slip, then every kind strikes each record with its own rate.
    """
    orders = view.orders
    typed: dict[str, dict[int, str]] = {name: {} for name in FIELDS}

    duplicates = np.flatnonzero(orders.original[rows.start : rows.stop] >= 0) + rows.start
    slipping = duplicates[rng.random(len(duplicates)) < DUPLICATE_SLIP_RATE]
    weights = np.array(list(DUPLICATE_SLIP_WEIGHTS.values()))
    choice = rng.choice(len(weights), size=len(slipping), p=weights / weights.sum())
    for k, name in enumerate(DUPLICATE_SLIP_WEIGHTS):
        kind = ERROR_KINDS[name]
        struck = slipping[choice == k]
        if kind.field == "order_number":
            struck = struck[orders.same_number[struck]]
        _strike(rng, kind, struck, view, typed)

    for name, rate in ERROR_RATES.items():
        struck = np.flatnonzero(rng.random(len(rows)) < rate) + rows.start
        _strike(rng, ERROR_KINDS[name], struck, view, typed)

    cell_rows = {name: np.array(sorted(cells), dtype=np.int64) for name, cells in typed.items()}
    values = {name: [typed[name][row] for row in cell_rows[name].tolist()] for name in FIELDS}
    return _Cells(cell_rows, values)


def _strike(
    rng: np.random.Generator,
    kind: _ErrorKind,
    rows: np.ndarray,
    view: _View,
    typed: dict[str, dict[int, str]],
) -> None:
    """Enters `kind`'s error at `rows`, skipping cells that already hold an error."""
    cells = typed[kind.field]
    rows = np.array([row for row in rows.tolist() if row not in cells], dtype=np.int64)
    for row, value in zip(rows.tolist(), view.column(kind.field, rows), strict=True):
        entered = kind.slip(value, rng)
        if entered != value:
            cells[row] = entered


# --- Staff -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Staff:
    """What staff did with the history: which errors and duplicates they found, and when they looked."""

    found_cells: np.ndarray  # one flag per wrong cell, in `_Cells` iteration order
    found_duplicates: np.ndarray  # one flag per history row; false for originals
    confirmed: np.ndarray  # one flag per history row: reviewed and found right
    corrected_at: np.ndarray  # datetime64[m] per history row


def _simulate_staff(rng: np.random.Generator, orders: _Orders, cells: _Cells, history: int) -> _Staff:
    """Staff find each error and each duplicate independently, and review a few clean records."""
    corrected_at = _correction_times(rng, orders.entered[:history])
    found_cells = rng.random(cells.count()) < STAFF_FIND_RATE
    duplicate = orders.original[:history] >= 0
    found_duplicates = duplicate & (rng.random(history) < STAFF_FIND_RATE)
    clean = ~duplicate
    for rows in cells.rows.values():
        clean[rows] = False
    confirmed = clean & (rng.random(history) < CONFIRM_RATE)
    return _Staff(found_cells, found_duplicates, confirmed, corrected_at)


def _correction_times(rng: np.random.Generator, entered: np.ndarray) -> np.ndarray:
    """When staff looked at each record: mostly within days of its entry, always in working hours."""
    delay = np.minimum(rng.exponential(STAFF_MEAN_DELAY_MINUTES, len(entered)), STAFF_MAX_DELAY_MINUTES)
    when = entered + (delay.astype(np.int64) + 1).astype("timedelta64[m]")
    day = when.astype("datetime64[D]")
    minute = (when - day).astype(np.int64)
    working_day = np.is_busday(day)
    early = working_day & (minute < WORK_START_MINUTE)
    late = ~working_day | (minute >= WORK_END_MINUTE)
    next_day = np.busday_offset(day, np.where(working_day, 1, 0), roll="forward")
    morning = WORK_START_MINUTE + rng.integers(0, 120, len(entered))
    day = np.where(late, next_day, day)
    minute = np.where(early | late, morning, minute)
    return day.astype("datetime64[m]") + minute.astype("timedelta64[m]")


# --- Logs ------------------------------------------------------------------------------------------------

_LogRow = tuple[str, str, str, str, str, str, str]
_Entry = tuple[int, int, _LogRow]  # (row, position within the row's log rows, log row), for sorting


def _edit_rows(view: _View, cells: _Cells, found: np.ndarray | None, when: list[str] | None) -> list[_Entry]:
    """An edit from the typed to the true value for each wrong cell, or only the `found` ones when given.

    `when` holds the correction time per row; without it the log's `corrected_at` stays empty.
    """
    entries = []
    offset = 0
    for position, (name, rows, values) in enumerate(cells):
        keep = np.ones(len(rows), dtype=bool) if found is None else found[offset : offset + len(rows)]
        offset += len(rows)
        kept = rows[keep]
        true_values = view.column(name, kept)
        ids = view.record_ids(kept)
        typed = [value for value, k in zip(values, keep.tolist(), strict=True) if k]
        for row, record_id, old, new in zip(kept.tolist(), ids, typed, true_values, strict=True):
            stamp = when[row] if when is not None else s.MISSING
            entries.append((row, position, (record_id, s.ACTION_EDIT, name, old, new, "", stamp)))
    return entries


def _merge_rows(view: _View, rows: np.ndarray, when: list[str] | None) -> list[_Entry]:
    """A merge into its original for each of `rows`, placed after the record's edits."""
    ids = view.record_ids(rows)
    originals = view.record_ids(view.orders.original[rows])
    entries = []
    for row, record_id, original in zip(rows.tolist(), ids, originals, strict=True):
        stamp = when[row] if when is not None else s.MISSING
        entries.append((row, len(FIELDS), (record_id, s.ACTION_MERGE, "", "", "", original, stamp)))
    return entries


def _staff_log(view: _View, cells: _Cells, staff: _Staff) -> list[_LogRow]:
    """The history's corrections log: what staff found and confirmed, in the order they did it."""
    when = _iso_seconds(staff.corrected_at)
    entries = _edit_rows(view, cells, staff.found_cells, when)
    entries += _merge_rows(view, np.flatnonzero(staff.found_duplicates), when)
    confirmed = np.flatnonzero(staff.confirmed)
    entries += [
        (row, len(FIELDS) + 1, (record_id, s.ACTION_CONFIRM, "", "", "", "", when[row]))
        for row, record_id in zip(confirmed.tolist(), view.record_ids(confirmed), strict=True)
    ]
    entries.sort(key=lambda entry: (entry[2][-1], entry[0], entry[1]))
    return [entry[2] for entry in entries]


def _truth_log(view: _View, cells: _Cells, rows: range) -> list[_LogRow]:
    """The log a perfect clerk would write for `rows`: every wrong cell and every duplicate, by record."""
    duplicates = np.flatnonzero(view.orders.original[rows.start : rows.stop] >= 0) + rows.start
    entries = _edit_rows(view, cells, None, None) + _merge_rows(view, duplicates, None)
    entries.sort(key=lambda entry: (entry[0], entry[1]))
    return [entry[2] for entry in entries]


# --- Writing ---------------------------------------------------------------------------------------------


def _write_records(path: Path, view: _View, rows: range, typed: _Cells) -> None:
    """Writes `rows` with the `typed` cells in place of the true values, in chunks to bound memory."""
    with path.open("w", encoding="utf-8", newline="") as file:
        writer = csv.writer(file, lineterminator="\n")
        writer.writerow(COLUMNS)
        for start in range(rows.start, rows.stop, WRITE_CHUNK_ROWS):
            chunk = np.arange(start, min(start + WRITE_CHUNK_ROWS, rows.stop))
            columns = {name: view.column(name, chunk) for name in COLUMNS}
            for name, cell_rows, values in typed:
                low, high = np.searchsorted(cell_rows, [chunk[0], chunk[-1] + 1])
                for row, value in zip(cell_rows[low:high].tolist(), values[low:high], strict=True):
                    columns[name][row - start] = value
            writer.writerows(zip(*(columns[name] for name in COLUMNS), strict=True))


def _write_log(path: Path, rows: list[_LogRow]) -> None:
    """Writes a corrections log with the contract's columns."""
    with path.open("w", encoding="utf-8", newline="") as file:
        writer = csv.writer(file, lineterminator="\n")
        writer.writerow(s.LOG_COLUMNS)
        writer.writerows(rows)
