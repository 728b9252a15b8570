"""Adapter residency: which adapter's weights sit in which LoRA slot, and how many rows use each slot.

As vLLM's `LoRALRUCache`: the capacity is the number of slots, the least recently used adapter is
evicted first, and the owner learns of each eviction through the callback it passed in
(`on_evict`), not by reading this object's state. Slot 0 is the base model (no adapter): always
there, never evicted. A slot whose adapter was replaced or removed while rows still use it is
retiring: it keeps its weights until its last row finishes. Used by the engine thread only.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Container

from tessera.serve.runtime.lora import AdapterWeights, LoraSlots


class AdapterSlots:
    def __init__(self, lora: LoraSlots, on_evict: Callable[[str, int], None]) -> None:
        self.lora = lora
        self._on_evict = on_evict
        self.resident: dict[str, int] = {}  # adapter name -> slot
        self._users = [0] * lora.slots
        self._owner: list[str | None] = [None] * lora.slots  # adapter whose weights are in the slot
        self._retiring: set[int] = set()  # slots of replaced or removed adapters that rows still use
        self._lru: OrderedDict[str, None] = OrderedDict()

    def __contains__(self, name: object) -> bool:
        return name in self.resident

    def __len__(self) -> int:
        return len(self.resident)

    def acquire(self, name: str | None) -> int:
        """The slot a new row of `name` (None: the base) runs in; the adapter becomes the most recently used."""
        if name is None:
            slot = 0
        else:
            slot = self.resident[name]
            self._lru.move_to_end(name)
        self._users[slot] += 1
        return slot

    def release(self, slot: int) -> None:
        """A row running in `slot` finished; a retiring slot is cleared with its last row."""
        self._users[slot] -= 1
        if slot in self._retiring and self._users[slot] == 0:
            self._retiring.discard(slot)
            self.lora.clear(slot)

    def install(self, name: str, weights: AdapterWeights, wanted: Container[str]) -> bool:
        """Put `weights` in a slot as `name` (replacing its older version); False while every slot is busy.

        A free slot first; else the least recently used idle adapter that no waiting request
        (`wanted`) needs; else the least recently used idle one anyway.
        """
        slot = self._free_slot(wanted)
        if slot is None:
            return False
        self.lora.install(slot, weights)
        if name in self.resident:
            self.remove(name)
        self.resident[name] = slot
        self._owner[slot] = name
        self._lru[name] = None
        return True

    def remove(self, name: str) -> None:
        """Unmap `name`; its slot is cleared now if idle, else when its last row finishes."""
        slot = self.resident.pop(name)
        self._lru.pop(name, None)
        self._owner[slot] = None
        if self._users[slot] == 0:
            self.lora.clear(slot)
        else:
            self._retiring.add(slot)

    def _free_slot(self, wanted: Container[str]) -> int | None:
        for slot in range(1, self.lora.slots):
            if self._owner[slot] is None and slot not in self._retiring:
                return slot
        for spare_wanted in (False, True):  # every idle slot is wanted: evict the least recently used anyway
            for victim in list(self._lru):
                slot = self.resident[victim]
                if self._users[slot] == 0 and (spare_wanted or victim not in wanted):
                    self._evict(victim)
                    return slot
        return None

    def _evict(self, name: str) -> None:
        slot = self.resident.pop(name)
        self._lru.pop(name, None)
        self._owner[slot] = None
        self.lora.clear(slot)
        self._on_evict(name, slot)
