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
