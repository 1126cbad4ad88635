"""koppel map previews a message's agenda entry and outbound messages without side effects."""

import json
from pathlib import Path

from engine.cli import main
from engine.store import open_store

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "tests" / "samples" / "zorgdomein"


def run(capsys, *args):
    code = main(["map", "--channels", str(REPO / "channels"), "--mappings", str(REPO / "mappings"), *args])
    return code, capsys.readouterr()


def test_an_appointment_request_previews_as_a_cardiology_entry_and_a_siu_for_the_his(capsys):
    code, out = run(capsys, "--channel", "zorgdomein-in", str(SAMPLES / "zd_srm_s01_appointment_request.hl7"))
    assert code == 0
    result = json.loads(out.out)
    assert result["mapping"]["name"] == "zorgdomein-srm"
    assert result["entry"]["agenda"] == "cardiology"
    assert result["entry"]["state"] == "requested"
    assert result["event"]["fields"]["patient.name"]["own_surname"] == "Boer"
    (outbound,) = result["outbound"]
    assert outbound["to"] == "his-scheduling"
    assert outbound["message"].startswith("MSH|^~\\&|") and "SIU^S12" in outbound["message"]
    assert "\nAIL|1|A|cardiology^^^" in outbound["message"]  # the agenda, as the engine sends it


def test_a_letter_on_its_own_previews_as_held_until_its_request(capsys):
    code, out = run(capsys, "--channel", "zorgdomein-in", str(SAMPLES / "zd_oru_r01_request_form_pdf.hl7"))
    result = json.loads(out.out)
    assert (code, result["outcome"], result["decision"]) == (0, "held", "hold")


def test_a_message_the_channel_does_not_accept_previews_its_ar(capsys, tmp_path):
    adt = REPO / "tests" / "samples" / "public" / "hapi_adt_a03.hl7"
    code, out = run(capsys, "--channel", "zorgdomein-in", str(adt))
    result = json.loads(out.out)
    assert code == 1 and result["accepted"] is False and result["answer"]["code"] == "AR"


def test_preview_reads_but_never_writes_the_store(capsys, tmp_path):
    url = f"sqlite:///{tmp_path}/k.db"
    open_store(url).close()
    code, _ = run(capsys, "--channel", "zorgdomein-in", "--store", url,
                  str(SAMPLES / "zd_srm_s01_appointment_request.hl7"))
    assert code == 0
    store = open_store(url)
    assert store.list_messages() == [] and store.list_agenda_entries() == []
    store.close()


def test_an_unknown_channel_is_a_usage_error(capsys):
    code, out = run(capsys, "--channel", "nope", str(SAMPLES / "zd_srm_s01_appointment_request.hl7"))
    assert code == 2 and "no channel 'nope'" in out.err


def test_with_a_store_the_stored_entrys_patient_fields_need_data_and_are_audited(capsys, tmp_path):
    import json as _json

    from engine.store import SaveAgendaEntry

    url = f"sqlite:///{tmp_path}/k.db"
    store = open_store(url)
    zd = "ZD200046139"  # the SRM sample's: its re-send finds this stored entry
    store.write([SaveAgendaEntry(
        entry_id=None, agenda_id="cardiology", kind="appointment-request", state="requested", zd_number=zd,
        placer_id=zd, filler_id=None, data=_json.dumps({"patient.bsn": "123456782", "patient.street": "Stored 1"}),
        attachments=(), keys=(f"zd:{zd}",), at=0.0, message_id=None, action="create", from_state=None)])
    store.close()
    sample = str(SAMPLES / "zd_srm_s01_appointment_request.hl7")
    code, out = run(capsys, "--channel", "zorgdomein-in", "--store", url, sample)
    data = json.loads(out.out)["entry"]["data"]
    assert code == 0 and data["patient.bsn"] == "(hidden: --data shows it)" and "Stored" not in out.out
    assert data["care_product"]["code"] == "CARREG001"  # the rest is shown
    with open_store(url) as s:
        assert s.list_audit() == []
    code, out = run(capsys, "--channel", "zorgdomein-in", "--store", url, "--data", sample)
    assert code == 0 and json.loads(out.out)["entry"]["data"]["patient.bsn"] != "(hidden: --data shows it)"
    with open_store(url) as s:
        (record,) = s.list_audit()
    assert record.action == "read-agenda-data" and "koppel map" in record.reason


def test_a_window_sent_without_a_time_of_day_previews_at_the_precision_sent(capsys, tmp_path):
    """Before: the preview's event and entry said `2016-04-01T00:00:00+02:00`, a time nobody sent."""
    raw = (SAMPLES / "zd_srm_s01_appointment_request.hl7").read_bytes().replace(
        b"|20160329^20160428|", b"|201604^20160528|")
    message = tmp_path / "srm.hl7"
    message.write_bytes(raw)
    code, out = run(capsys, "--channel", "zorgdomein-in", str(message))
    result = json.loads(out.out)
    assert code == 0
    for shown in (result["event"]["fields"], result["entry"]["data"]):
        assert (shown["requested_start"], shown["requested_end"]) == ("2016-04", "2016-05-28")
    assert "SCH|ZD200046139" in result["outbound"][0]["message"]
    assert "|^^^201604^20160528^R|" in result["outbound"][0]["message"]


def test_without_data_the_outbound_built_from_the_stored_entry_shows_no_patient_field(capsys, tmp_path):
    """The SIU^S15 of a cancel takes the patient from the stored entry: without --data only its
    MSH and segment names are printed; with --data all of it."""
    import json as _json

    from engine.store import SaveAgendaEntry

    url = f"sqlite:///{tmp_path}/k.db"
    zd = "ZD200046139"
    stored = {"patient.bsn": "123456782", "patient.name": {"surname": "Opgeslagen", "own_surname": "Opgeslagen"},
              "_sent": {"his-scheduling": "SIU^S12"}}
    with open_store(url) as store:
        store.write([SaveAgendaEntry(
            entry_id=None, agenda_id="cardiology", kind="appointment-request", state="requested", zd_number=zd,
            placer_id=zd, filler_id=None, data=_json.dumps(stored), attachments=(), keys=(f"zd:{zd}",), at=0.0,
            message_id=None, action="create", from_state=None)])
    cancel = tmp_path / "s04.hl7"
    sample = (SAMPLES / "zd_srm_s01_appointment_request.hl7").read_bytes().replace(b"SRM^S01", b"SRM^S04")
    cancel.write_bytes(b"\r".join(s for s in sample.split(b"\r") if not s.startswith(b"PID")))  # thin: no PID
    code, out = run(capsys, "--channel", "zorgdomein-in", "--store", url, str(cancel))
    (outbound,) = json.loads(out.out)["outbound"]
    assert code == 0 and outbound["to"] == "his-scheduling"
    assert outbound["message"].startswith("MSH|") and "SIU^S15" in outbound["message"]
    assert "hidden, --data shows them" in outbound["message"] and "SCH PID" in outbound["message"]
    assert "Opgeslagen" not in out.out and "123456782" not in out.out
    code, out = run(capsys, "--channel", "zorgdomein-in", "--store", url, "--data", str(cancel))
    (outbound,) = json.loads(out.out)["outbound"]
    assert "Opgeslagen" in outbound["message"]


def test_an_embedded_document_is_elided_in_the_printed_outbound(capsys, tmp_path):
    """A letter's base64 (the MDM^T02's OBX-5) is printed as its length, not as megabytes."""
    import base64

    from engine.bundle import load_bundle
    from engine.preview import preview
    from engine.store import SaveAgendaEntry

    zd = "ZD200046119"
    with open_store(f"sqlite:///{tmp_path}/k.db") as store:
        store.write([SaveAgendaEntry(
            entry_id=None, agenda_id="cardiology", kind="referral", state="requested", zd_number=zd, placer_id=None,
            filler_id=None, data="{}", attachments=(), keys=(f"zd:{zd}",), at=0.0, message_id=None, action="create",
            from_state=None)])
        data = base64.b64encode(b"%PDF-1.4\n" + bytes(range(256)) * 400).decode()
        raw = (f"MSH|^_\\&|ZorgDomein||||20160324163507+0100||ORU^R01|{zd}|P|2.4\r"
               "PID|1||123456782^^^NLMINBIZA^NNNLD||Testpatient&&Testpatient^J^^^^^L||19800101|M\r"
               f"ORC|XO|{zd}\rOBR|1|{zd}\rOBX|1|ED|BLOB^Bijlage^ZORGDOMEIN|1|^application^pdf^Base64^{data}||||||F\r"
               "NTE|1|P|brief.pdf|RE\r").encode("latin-1")
        bundle = load_bundle(REPO / "channels", REPO / "mappings")
        result = preview(bundle, "zorgdomein-in", raw, store=store, patient_data=True)
    (outbound,) = result["outbound"]
    assert f"<{len(data)} characters of encoded data>" in outbound["message"]
    assert data[:300] not in outbound["message"] and len(outbound["message"]) < 2000
