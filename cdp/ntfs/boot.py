"""The NTFS boot sector: geometry, where the MFT starts, the record size, the serial."""

from __future__ import annotations

from cdp.errors import Corruption
from cdp.ntfs.defs import BOOT_SIGNATURE, NTFS_OEM_ID, PACKED_BOOT_SECTOR


class BootSector:
    """The parsed first sector of an NTFS volume. Cost: one 512-byte unpack."""

    __slots__ = (
        "bytes_per_sector",
        "cluster_size",
        "index_record_size",
        "mft2_lcn",
        "mft_lcn",
        "record_size",
        "sectors_per_cluster",
        "serial",
        "total_sectors",
    )

    def __init__(
        self, bytes_per_sector: int, sectors_per_cluster: int, total_sectors: int,
        mft_lcn: int, mft2_lcn: int, record_size: int, index_record_size: int, serial: int,
    ) -> None:
        self.bytes_per_sector = bytes_per_sector
        self.sectors_per_cluster = sectors_per_cluster
        self.cluster_size = bytes_per_sector * sectors_per_cluster
        self.total_sectors = total_sectors
        self.mft_lcn = mft_lcn
        self.mft2_lcn = mft2_lcn
        self.record_size = record_size
        self.index_record_size = index_record_size
        self.serial = serial

    @property
    def size(self) -> int:
        """Bytes the volume covers (NumberSectors; the backup boot sector follows)."""
        return self.total_sectors * self.bytes_per_sector

    @staticmethod
    def is_ntfs(sector: bytes) -> bool:
        """True when *sector* looks like an NTFS boot sector (OEM id and signature)."""
        return len(sector) >= 512 and sector[3:11] == NTFS_OEM_ID and sector[510:512] == BOOT_SIGNATURE

    @classmethod
    def from_bytes(cls, sector: bytes) -> BootSector:
        """Parse and sanity-check a boot sector; raises Corruption when it is not NTFS."""
        if not cls.is_ntfs(sector):
            raise Corruption("not an NTFS boot sector (OEM id or 55 AA signature missing)")
        f = PACKED_BOOT_SECTOR.unpack_from(sector, 0)
        bps, spc_raw = f[2], f[3]
        number_sectors, mft_lcn, mft2_lcn, cpfrs, cpib, serial = f[15], f[16], f[17], f[18], f[20], f[22]
        # values above 0x80 encode a power of two: 2 ** (256 - value) sectors
        spc = spc_raw if spc_raw <= 0x80 else 1 << (256 - spc_raw)
        if bps not in (256, 512, 1024, 2048, 4096) or spc == 0 or spc & (spc - 1):
            raise Corruption(f"NTFS boot sector: bad geometry ({bps} bytes/sector, {spc_raw} sectors/cluster)")
        cluster = bps * spc
        record_size = cluster * cpfrs if cpfrs > 0 else 1 << -cpfrs
        index_size = cluster * cpib if cpib > 0 else 1 << -cpib
        if not 256 <= record_size <= 65536 or record_size % bps:
            raise Corruption(f"NTFS boot sector: bad file record size {record_size}")
        if number_sectors == 0 or mft_lcn * spc >= number_sectors:
            raise Corruption(f"NTFS boot sector: MFT at cluster {mft_lcn} is outside the volume")
        return cls(bps, spc, number_sectors, mft_lcn, mft2_lcn, record_size, index_size, serial)

    def __repr__(self) -> str:
        return (f"BootSector(cluster={self.cluster_size}, record={self.record_size}, "
                f"mft_lcn={self.mft_lcn}, serial={self.serial:016x}, size={self.size})")
