# ruff: noqa: E501 (page texts are prose, one paragraph per line)
"""Build `demo.pdf`: six pages of plain text, each on a different subject, so an answer can be
checked against its page. Run `python -m vramflow.demo.make_demo` to rebuild it."""

from __future__ import annotations

from pathlib import Path

from vramflow.demo.pdfgen import write_text_pdf

PAGES = [
    """The Printing Press
Around 1440 in Mainz, Johannes Gutenberg combined movable metal type, an oil-based ink and a screw press adapted from wine making. Each letter was cast from an alloy of lead, tin and antimony in a hand mould, so thousands of identical pieces could be made and reused.
The 42-line Bible, finished about 1455, showed that a press could produce books faster and more cheaply than scribes. Within fifty years presses were running in more than two hundred European cities, and roughly twenty million books had been printed.
Cheaper books spread literacy, standardised spelling and helped ideas of the Reformation and the Scientific Revolution travel quickly across Europe.""",
    """Photosynthesis
Plants, algae and some bacteria turn light into chemical energy through photosynthesis. In the chloroplasts of a leaf, the pigment chlorophyll absorbs mostly red and blue light and reflects green, which is why leaves look green.
The light-dependent reactions split water molecules, release oxygen as a by-product and store energy in ATP and NADPH. The Calvin cycle then uses that energy to fix carbon dioxide from the air into sugars such as glucose.
Almost all the oxygen in the atmosphere and most of the food chain depend on this process, which captures about one hundred terawatts of solar power worldwide.""",
    """GPU Memory and Large Models
A graphics processor running a neural network must keep the model weights, the activations of the current batch and a cache of attention keys and values in its own memory, called VRAM. A card with 24 gigabytes can hold a model of about ten billion parameters in half precision, with little room left for long inputs.
When several requests reach the same card at once, each allocates its own activations and cache. Memory runs out, the framework raises an out-of-memory error and the request fails.
Batching requests, limiting how many run at once and freeing cached blocks between jobs keep the card busy without overflowing it.""",
    """The Water Cycle
Water moves continuously between the oceans, the air and the land. The sun heats the surface of seas and lakes, and water evaporates into vapour; plants add more through transpiration from their leaves.
As moist air rises it cools, and the vapour condenses on tiny dust particles to form clouds. When droplets grow heavy enough they fall as rain, snow or hail.
Precipitation soaks into the ground to refill aquifers, runs off into rivers, or is stored for years in glaciers and ice caps before it returns to the sea and the cycle begins again.""",
    """Roman Aqueducts
Ancient Rome was supplied by eleven aqueducts built between 312 BC and AD 226, carrying water from springs and rivers up to ninety kilometres away. Most of each channel ran underground; the famous arched bridges were used only to cross valleys.
Engineers kept a gentle, steady slope, sometimes less than one metre of drop per kilometre, so that gravity alone moved the water. Settling tanks removed sediment, and lead and terracotta pipes distributed it to public fountains, baths and wealthy homes.
At its peak the system delivered around one million cubic metres of water a day to the city.""",
    """Honeybees
A honeybee colony holds one queen, a few hundred male drones and tens of thousands of female workers. Workers change jobs as they age: they clean cells, nurse larvae, build wax comb, guard the entrance and finally forage for nectar and pollen.
A forager that finds a rich patch of flowers returns to the hive and performs a waggle dance. The angle of the dance relative to vertical tells other bees the direction of the food relative to the sun, and its length tells the distance.
Bees pollinate about a third of the crops people eat, including almonds, apples and blueberries.""",
]


def main() -> None:
    target = Path(__file__).with_name("demo.pdf")
    write_text_pdf(target, PAGES, title="vramflow demo: six subjects")
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
