from sfd.cli import main


def test_dispatches_to_assets_and_rejects_unknown(capsys):
    assert main(["assets", "list"]) == 0
    assert "edm-cifar10-32x32-uncond-vp" in capsys.readouterr().out
    assert main(["nope"]) == 2
    assert "unknown command" in capsys.readouterr().err
    assert main([]) == 2
