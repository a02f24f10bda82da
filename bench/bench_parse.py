"""Parse speed: our tokenizer against hl7apy, measured in the same run.

    python bench/bench_parse.py [message-file ...]

Without arguments it measures a typical SIU^S12 (about 1.5 KB, CR-separated
as on the wire). For each message it prints microseconds per parse, per parse
plus reading 20 fields the way the SIU mapping does, and per
``hl7apy.parser.parse_message`` (its defaults, and tolerant without groups),
with the ratio. Best of several runs, on one core. The 20 fields are read
only from messages that have SCH, PID, PV1 and AIS.
"""

from __future__ import annotations

import argparse
import timeit
from pathlib import Path

from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message

from hl7.message import Message, parse, split_messages


def _segment(name: str, fields: dict[int, str]) -> str:
    """One segment from its fields by position, so the sample is easy to check."""
    return "|".join([name] + [fields.get(n, "") for n in range(1, max(fields) + 1)])


TYPICAL_SIU = "\r".join(
    [
        "MSH|^~\\&|CADENCE|NORTH_CAMPUS|SLOTENGINE|CLINICS|20260320100512+0100||SIU^S12^SIU_S12|"
        "88231457|P|2.5.1|||AL|NE||UNICODE UTF-8",
        _segment("SCH", {
            1: "APT-20260325-0042^CADENCE", 2: "F-991032^SLOTENGINE",
            7: "ROUTINE^Routine visit^HL70276", 8: "FOLLOWUP^Follow-up^HL70277", 9: "30", 10: "MIN",
            11: "^^30^20260325140000+0100^20260325143000+0100", 12: "1027^SCHEDULER^ANNA^^^^^^NORTH",
            13: "^WPN^PH^^^555^0100", 16: "1027^SCHEDULER^ANNA^^^^^^NORTH",
            20: "1027^SCHEDULER^ANNA^^^^^^NORTH", 25: "Booked^Booked^HL70278",
        }),
        "TQ1|1||||||20260325140000+0100|20260325143000+0100|R^Routine^HL70485",
        "NTE|1||Patient asks for a ground-floor room; bring previous X-rays\\.br\\Interpreter: Portuguese",
        _segment("PID", {
            1: "1", 3: "4477120^^^NORTH^MR~9434765919^^^NHS^NH", 5: "DA SILVA^MARIA^JOSE^^MRS^^L",
            7: "19580412", 8: "F", 11: "12 RIVERSIDE WAY^FLAT 3^NEWTOWN^^NT1 4AB^GBR^H",
            13: "^PRN^PH^^44^1632^960123~^NET^Internet^maria@example.org",
            15: "por^Portuguese^ISO6392", 16: "M^Married^HL70002", 30: "N",
        }),
        _segment("PV1", {
            1: "1", 2: "O", 3: "CARD^OP2^4^NORTH^^^^^Cardiology outpatients",
            8: "1189^HEART^JAMES^^^DR^^^NORTH", 10: "CAR", 15: "A1", 19: "V77123^^^NORTH^VN",
            44: "20260325140000+0100",
        }),
        "RGS|1|A",
        "AIS|1|A|CARD-FU^Cardiology follow-up^L|20260325140000+0100|0|MIN|30|MIN|Y|Booked",
        "AIL|1|A|CARD^OP2^4^NORTH|C^Clinic^HL70305||20260325140000+0100|0|MIN|30|MIN|Y|Booked",
        "AIP|1|A|1189^HEART^JAMES^^^DR|ATND^Attending^HL70182||20260325140000+0100|0|MIN|30|MIN|Y|Booked",
        "",
    ]
).encode("utf-8")


READ_SEGMENTS = ("SCH", "PID", "PV1", "AIS")


def read_fields(msg: Message) -> list[str]:
    """The 20 values an SIU mapping reads first."""
    sch, pid, pv1, ais = (msg.first(name) for name in READ_SEGMENTS)
    return [
        msg.control_id, msg.message_type, msg.trigger_event, msg.sending_application,
        sch.value(1), sch.value(2), sch.value(7), sch.value(11, 4), sch.value(11, 5),
        sch.value(25), pid.value(3), pid.value(3, 4), pid.value(3, repetition=2),
        pid.value(5), pid.value(5, 2), pid.value(7), pid.value(8), pid.value(15),
        pv1.value(15), ais.value(3),
    ]


def best_microseconds(function, repeat: int = 7) -> float:
    """Best of ``repeat`` runs of at least 0.2 s each."""
    timer = timeit.Timer(function)
    number, _ = timer.autorange()
    return min(timer.repeat(repeat=repeat, number=number)) / number * 1e6


def measure(label: str, raw: bytes) -> None:
    text = raw.decode(parse(raw).encoding).lstrip("\ufeff").replace("\r\n", "\r").replace("\n", "\r")
    ours = best_microseconds(lambda: parse(raw))
    readable = all(parse(raw).first(name) for name in READ_SEGMENTS)
    ours_fields = best_microseconds(lambda: read_fields(parse(raw))) if readable else None
    theirs = best_microseconds(lambda: parse_message(text), repeat=3)
    theirs_flat = best_microseconds(
        lambda: parse_message(text, VALIDATION_LEVEL.TOLERANT, find_groups=False), repeat=3
    )
    print(f"{label}: {len(raw)} bytes, {len(parse(raw).segments)} segments")
    print(f"  slotengine parse              {ours:10.1f} us   {1e6 / ours:10.0f} msg/s")
    if ours_fields is not None:
        print(f"  slotengine parse + 20 fields  {ours_fields:10.1f} us   {1e6 / ours_fields:10.0f} msg/s")
    print(f"  hl7apy parse_message          {theirs:10.1f} us   {1e6 / theirs:10.0f} msg/s"
          f"   x{theirs / ours:,.0f}")
    print(f"  hl7apy tolerant, no groups    {theirs_flat:10.1f} us   {1e6 / theirs_flat:10.0f} msg/s"
          f"   x{theirs_flat / ours:,.0f}")


def main(paths: list[str]) -> None:
    if not paths:
        measure("typical SIU^S12", TYPICAL_SIU)
    for path in paths:
        for number, raw in enumerate(split_messages(Path(path).read_bytes()), 1):
            measure(f"{path} #{number}", raw)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="*", type=Path, metavar="FILE",
                        help="files of HL7 messages (any segment endings, batches); default: a typical SIU^S12")
    arguments = parser.parse_args()
    for missing in [f for f in arguments.files if not f.is_file()]:
        parser.error(f"{missing}: no such file")
    main([str(f) for f in arguments.files])
