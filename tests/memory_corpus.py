"""A retrieval corpus on invented topics (so the embedding model cannot know them already):
each document states facts about one made-up thing, and its question asks for one of those
facts in other words."""

from __future__ import annotations

# (document uuid, document text, a question that paraphrases it)
CORPUS: list[tuple[str, str, str]] = [
    ("quillfern", "The quillfern is a pale fern that grows only on the north walls of old salt mines. "
     "It needs brine mist twice a day and dies in direct sunlight.",
     "Where does the quillfern plant live, and what light kills it?"),
    ("brasswick", "Brasswick is a harbour town whose lighthouse burns whale-free lamp oil pressed from "
     "sunflower seeds. The keeper rings a copper bell every ninety minutes during fog.",
     "How often is the bell sounded by the lighthouse keeper in Brasswick when it is foggy?"),
    ("zorvian-tea", "Zorvian tea is brewed from roasted acorn shells and blue mint. Drinkers add a pinch "
     "of chalk to soften its bitterness, and it is served cold at weddings.",
     "What do people put in Zorvian tea to make it less bitter?"),
    ("gloamrail", "The Gloamrail is a night train that runs between Ostrava Vale and Pellin Cross. It "
     "carries no lights inside the carriages so passengers can watch the aurora.",
     "Which two stations does the Gloamrail connect, and why are its cars kept dark?"),
    ("mirewolf", "Mirewolves are marsh predators with webbed paws. They hunt eels at dusk and raise "
     "their pups inside hollow willow stumps.",
     "Where do mirewolf parents keep their young?"),
    ("tessellite", "Tessellite is a mineral that forms perfect hexagonal tiles. Masons in Kardo split it "
     "with bone wedges because iron tools shatter it.",
     "Why do builders avoid metal chisels when cutting tessellite?"),
    ("velsong", "Velsong is a choral style sung only by left-handed singers in the Orrin valley. Each "
     "song lasts exactly one hour and ends with a whistle.",
     "How long does a Velsong performance go on, and how does it finish?"),
    ("drummet", "The drummet is a six-stringed instrument made from a turtle-shaped gourd. It is tuned "
     "by soaking the strings in vinegar overnight.",
     "How do musicians adjust the pitch of a drummet?"),
    ("copperleaf-festival", "The Copperleaf Festival takes place every third autumn in Helmsby. Children "
     "fold maple leaves into boats and race them down the mill stream.",
     "What do kids do with leaves during the celebration in Helmsby?"),
    ("orbweaver-clock", "The orbweaver clock in Tarrow Square keeps time with a spider-silk pendulum. It "
     "loses four seconds every humid summer and is reset each equinox.",
     "What kind of pendulum drives the clock in Tarrow Square?"),
    ("sablemoth", "Sablemoths migrate toward lit bakeries and feed on spilled flour. Their wings carry a "
     "dust that smells of cinnamon when crushed.",
     "What scent comes from the wings of a sablemoth?"),
    ("ketterby-cheese", "Ketterby cheese is aged inside hollow oak logs sunk in a cold lake for seven "
     "years. It has a green rind and tastes of hazelnut.",
     "How long and where is Ketterby cheese matured?"),
    ("frostglass", "Frostglass is a window pane that turns opaque below freezing. Farmers in Lund use it "
     "in barns as a cheap warning of frost.",
     "Why do farmers in Lund put frostglass in their barns?"),
    ("hollowmere-library", "The Hollowmere library lends books only by moonlight. Borrowers must return "
     "each volume before the next full moon or pay a fine in candles.",
     "What is the penalty for returning a Hollowmere book late?"),
    ("ridgeback-goat", "Ridgeback goats climb basalt cliffs using hooves with a rubbery pad. Their milk "
     "is pink because they eat wild beetroot.",
     "What gives ridgeback goat milk its unusual color?"),
    ("lanternfish-soup", "Lanternfish soup is a winter dish from the island of Mor. It is thickened with "
     "crushed seaweed crackers and eaten during the longest night.",
     "On which night do the people of Mor traditionally eat their fish soup?"),
    ("pellucid-engine", "The pellucid engine is a steam engine with glass cylinders, built so apprentices "
     "can watch the pistons move. It runs at low pressure to avoid cracking.",
     "Why does the transparent steam engine operate at reduced pressure?"),
    ("thornbury-dialect", "In the Thornbury dialect the word 'skellow' means both rain and gossip. "
     "Speakers tap their chin to show which meaning they intend.",
     "How do Thornbury speakers signal which sense of 'skellow' they mean?"),
    ("duskfinch", "Duskfinches build nests from discarded fishing line. The males sing backwards "
     "melodies to attract mates in early spring.",
     "What material do duskfinches use to make their nests?"),
    ("amberroot", "Amberroot is a tuber that glows faintly orange when boiled. Cooks in Varn serve it "
     "mashed with goat butter as a festival side dish.",
     "Which vegetable shines when it is cooked in water?"),
    ("skyloom", "A skyloom is a loom suspended from a kite, used by the Aerin people to weave cloth from "
     "cloud-spider thread at high altitude.",
     "What device do the Aerin hang from a kite to make fabric?"),
    ("grindle-pass", "Grindle Pass is a mountain road closed every winter by avalanches. Travellers use "
     "sledges pulled by trained ibex when it reopens in May.",
     "Which animals haul sleds over Grindle Pass?"),
    ("murmurstone", "Murmurstones hum when the air pressure drops, so sailors keep them in cabins to "
     "predict storms a day ahead.",
     "How can a stone warn seafarers of bad weather?"),
    ("pewter-guild", "The Pewter Guild of Ashcombe admits new members only after they cast a perfect "
     "spoon blindfolded. Failed candidates may retry after a year.",
     "What test must an apprentice pass to join the Ashcombe metalworkers?"),
    ("cinderbloom", "Cinderbloom flowers open only after a forest fire. Their seeds need ash-rich soil "
     "and sprout within three days of rain.",
     "What event causes the cinderbloom to flower?"),
    ("vantor-coins", "Vantor coins are square with a hole in each corner. Merchants string them on "
     "leather cords and count value by the number of knots.",
     "What shape is Vantor money?"),
    ("eelgrass-rope", "Eelgrass rope is braided by the fishers of Saltmarsh and cured in smoke for a "
     "month. It does not rot in seawater for twenty years.",
     "How is the durable rope from Saltmarsh treated after braiding?"),
    ("lumen-beetle", "Lumen beetles are kept in jars as night lights in Quorra. They need a diet of "
     "rotten pears and must be released after one season.",
     "What do the glowing beetles of Quorra eat?"),
    ("tidewright", "A tidewright is a builder of tide mills. The guild's oldest mill at Fennick grinds "
     "barley using only the incoming tide.",
     "What grain does the ancient tide-driven mill at Fennick process?"),
    ("snowharp", "The snowharp is played outdoors in winter; its strings are icicles tuned by length. "
     "Concerts end when the sun melts the instrument.",
     "What ends a snowharp concert?"),
    ("gallowmere-ferry", "The Gallowmere ferry is rowed by twelve oarsmen who chant numbers in reverse. "
     "Crossing the lake takes two hours and costs one egg.",
     "What is the fare for crossing the lake on the Gallowmere boat?"),
    ("ironbark-tree", "Ironbark trees grow so slowly that a trunk one hand wide is three hundred years old. "
     "Their wood sinks in water.",
     "What happens when you drop ironbark timber into a pond?"),
    ("whisperwell", "The Whisperwell in Dunmore repeats any question asked into it after exactly seven "
     "seconds. Locals use it to settle arguments about who spoke first.",
     "How long does the echo take at the Dunmore well?"),
    ("marrowbread", "Marrowbread is baked with squash flour and rosemary in clay ovens. It stays fresh "
     "for a month because of its thick salted crust.",
     "Why does marrowbread keep for weeks without going stale?"),
    ("parrow-kite", "Parrow kites are flown to scare crows from rice terraces. Each kite is painted with "
     "the eyes of an eagle and flown from dawn to noon.",
     "What is painted on the kites that protect the rice fields?"),
    ("ossory-bridge", "The Ossory bridge is built from stacked millstones without mortar. Carts may cross "
     "only at walking pace, one at a time.",
     "How many wagons may be on the Ossory bridge at once?"),
    ("glimmer-ink", "Glimmer ink is made from crushed beetle shells and is invisible until warmed by a "
     "candle. Spies in Veld used it for secret letters.",
     "How does a reader reveal a message written in glimmer ink?"),
    ("harrowfield-race", "The Harrowfield race is run by farmers carrying sacks of turnips uphill. The "
     "winner gets a silver hoe and the loser cooks the feast.",
     "What prize is awarded to the champion of the turnip-carrying contest?"),
    ("corvane-script", "Corvane script is written in spirals starting from the centre of the page. Only "
     "nine scholars alive can still read it.",
     "In what pattern is Corvane writing laid out?"),
    ("mossback-turtle", "Mossback turtles carry gardens of moss on their shells. Villagers in Pell "
     "harvest the moss each spring to stuff pillows.",
     "What do the people of Pell use the moss from turtle shells for?"),
    ("salt-choir", "The Salt Choir of Ebbmouth sings only at low tide on the exposed sand flats. Their "
     "songs are said to call the herring back.",
     "When does the Ebbmouth choir perform?"),
    ("vellum-bees", "Vellum bees make paper-thin combs used by monks as writing sheets. Their honey is "
     "bitter and used only as medicine.",
     "What do monks do with the combs of vellum bees?"),
    ("stormcellar-cider", "Stormcellar cider is fermented in barrels buried during thunderstorms. Brewers "
     "believe lightning gives it a sharp taste.",
     "When are the barrels for this cider put underground?"),
    ("lodestar-compass", "The lodestar compass points to the nearest fresh water rather than north. "
     "Desert caravans in Sarn carry one per camel train.",
     "Instead of north, what does the Sarn compass indicate?"),
    ("featherstone-quarry", "Featherstone quarry produces a stone so light it floats. Builders use it for "
     "roofs of rafts and floating markets.",
     "What is special about the rock cut at Featherstone?"),
    ("nettlecloth", "Nettlecloth is woven from stinging nettle fibre soaked in milk. It is itchy for the "
     "first year and then softer than linen.",
     "How does nettlecloth feel once it has been worn for a long time?"),
    ("owlpost", "Owlpost in Brackenridge delivers letters by trained barn owls after sunset. Parcels "
     "heavier than a plum are refused.",
     "What is the weight limit for packages sent through the Brackenridge bird mail?"),
    ("quarrel-stones", "Quarrel stones are two flat rocks that neighbours in Hest hold while arguing; "
     "whoever drops one first must apologise.",
     "What happens to the person who lets go of a quarrel stone?"),
    ("sunpeach", "Sunpeaches ripen only in the shade of walnut trees. Their skin is silver and their pit "
     "can be planted the same day.",
     "What must shade a sunpeach orchard?"),
    ("emberfox", "Emberfoxes have red-tipped fur that stays warm after sunset. Hunters are forbidden to "
     "trap them in the province of Aldren.",
     "Where is it illegal to catch emberfoxes?"),
    ("carillon-of-vess", "The carillon of Vess has forty bells cast from melted ship anchors. It plays a "
     "sea shanty at every noon.",
     "What metal were the Vess bells made from?"),
    ("mudlark-school", "The mudlark school teaches orphans to search river banks for lost coins. Lessons "
     "start at low tide and end when the water returns.",
     "What do pupils at the mudlark school learn to find?"),
    ("reedpipe-signal", "Reedpipe signals carry news across the Fenlands: each village plays a three-note "
     "call that the next village repeats.",
     "How does news travel between villages in the Fenlands?"),
    ("starling-bread-law", "The starling bread law of Wyck requires bakers to leave the first loaf of each "
     "day on the roof for the birds.",
     "What does Wyck's law oblige bakers to do with their first loaf?"),
]
