import pytest

from chubbyfs.testing.localcell import LocalCell


@pytest.fixture
def make_cell(tmp_path):
    cells = []

    def make(replicas: int = 3, **options) -> LocalCell:
        directory = tmp_path / f"cell{len(cells)}"
        directory.mkdir()
        cell = LocalCell(directory, replicas, **options)
        cells.append(cell)
        return cell

    yield make
    for cell in cells:
        cell.stop_all()
